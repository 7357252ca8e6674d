"""Gradient-free EV3 proposers built on evosax (OpenAI-ES, CMA-ES, Sep-CMA-ES, ...).

```python
from ev3_evosax import OpenES, SepCMAES, CMAES, EvosaxProposer
```

Installed, the plugin registers the proposers `"open_es"`, `"sep_cma_es"`, `"cma_es"` and
`"evosax"` (any distribution-based evosax strategy by name). See `docs/evosax.md`.
"""

from ._proposers import (
    CMAES as CMAES,
    STRATEGIES as STRATEGIES,
    EvosaxProposer as EvosaxProposer,
    EvosaxState as EvosaxState,
    OpenES as OpenES,
    SepCMAES as SepCMAES,
)

__version__ = "0.1.0"

__all__ = ["CMAES", "STRATEGIES", "EvosaxProposer", "EvosaxState", "OpenES", "SepCMAES"]
