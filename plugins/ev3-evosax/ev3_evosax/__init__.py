"""Gradient-free EV3 proposers built on evosax (OpenAI-ES, CMA-ES, Sep-CMA-ES, ...).

```python
from ev3_evosax import EvosaxProposer, cma_es, open_es, sep_cma_es
```

One final class, `EvosaxProposer` (any distribution-based evosax strategy by name), and
factory functions for the common strategies. Installed, the plugin registers the proposer
`"evosax"`. See `docs/evosax.md`.
"""

from ._proposers import (
    STRATEGIES as STRATEGIES,
    EvosaxProposer as EvosaxProposer,
    EvosaxState as EvosaxState,
    cma_es as cma_es,
    open_es as open_es,
    sep_cma_es as sep_cma_es,
)

__version__ = "0.1.0"

__all__ = ["STRATEGIES", "EvosaxProposer", "EvosaxState", "cma_es", "open_es", "sep_cma_es"]
