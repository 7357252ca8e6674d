"""The kit's `Example`: a component instance with the options to check it with."""

from __future__ import annotations

from typing import Any


class Example:
    """An example instance of a component with the options to check it with.

    Return these from the `ev3_conformance_examples` hook when a component needs its own
    model or data (`problem=`), several objectives (`num_objectives=`), a deterministic
    proposer (`uses_key=False`) or explicit hyperparameter `variants=`.

    ```python
    Example(MyProposer(scale=0.1), variants=[MyProposer(scale=0.2)])
    ```
    """

    def __init__(self, component: Any, /, **options: Any):
        self.component = component
        self.options = options
        self.error: str | None = None
        self.label = ""

    def __repr__(self) -> str:
        return f"Example({type(self.component).__qualname__}, {self.label or 'unregistered'})"
