"""Token ids to text for the trajectory page, with the run's own tokenizer when one is found.

Where the tokenizer comes from, first found wins: `config.yaml`'s `model.path` (absolute, or
relative to the run directory), then `RUN_DIR/model/sft`, then `RUN_DIR/model/init` (the
directories `cwm-rl train` makes), then the newest published version (`cwm_rl.run_files`). It is loaded with `transformers.AutoTokenizer` when that is
installed (the `train` extra); without it, or without a model directory, the page shows token ids.
Each token is decoded on its own (`decode([id])`), so a character split over several byte-level
tokens shows as U+FFFD in each; the turn's text beside the tokens shows it whole.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

from cwm_rl.run_files import find_model_dir

MAX_CACHE = 300_000  # decoded ids kept per run: bounded by the vocabulary in practice


class TokenText:
    """Lazily loads the run's tokenizer once; `texts(ids)` is then a dict lookup per token."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._loaded = False
        self._tokenizer: Any = None
        self._why_not: str | None = None
        self._source: Path | None = None
        self._cache: dict[int, str] = {}

    def model_dir(self) -> Path | None:
        """Where the run's tokenizer is (`cwm_rl.run_files.find_model_dir`), or None."""
        return find_model_dir(self.run_dir)

    @property
    def loaded(self) -> bool:
        """Whether the tokenizer was looked for already (the first look imports transformers: seconds)."""
        return self._loaded

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            model_dir = self.model_dir()
            if model_dir is None:
                self._why_not = "no tokenizer found (config.yaml model.path, model/sft, model/init): showing token ids"
            elif importlib.util.find_spec("transformers") is None:
                self._why_not = "transformers is not installed (the `train` extra): showing token ids"
            else:
                try:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
                    self._source = model_dir
                except Exception as e:  # any broken tokenizer dir: ids are still worth showing
                    self._why_not = f"could not load the tokenizer of {model_dir} ({type(e).__name__}: {e}): showing token ids"
            self._loaded = True

    def available(self) -> bool:
        """Loads the tokenizer on first call (a few seconds: transformers imports); False when ids are shown."""
        self._load()
        return self._tokenizer is not None

    def texts(self, ids: list[int]) -> list[str] | None:
        """The text of each token, or None when there is no tokenizer (the page then shows the ids)."""
        self._load()
        if self._tokenizer is None:
            return None
        cache = self._cache
        missing = sorted({i for i in ids if i not in cache})
        if missing:
            if len(cache) + len(missing) > MAX_CACHE:
                cache.clear()
            try:
                decoded = self._tokenizer.batch_decode([[i] for i in missing])
            except (IndexError, OverflowError, TypeError, ValueError):  # an id outside the vocabulary (another model)
                decoded = [self._safe_decode(i) for i in missing]
            cache.update(zip(missing, decoded))
        return [cache.get(i, f"<{i}>") for i in ids]

    def _safe_decode(self, token_id: int) -> str:
        try:
            return self._tokenizer.decode([token_id])
        except (IndexError, OverflowError, TypeError, ValueError):
            return f"<{token_id}?>"

    def describe(self) -> dict[str, Any]:
        """Whether tokens show as text, and from which directory (or why not), without loading anything."""
        if not self._loaded:
            model_dir = self.model_dir()
            return {"loaded": False, "source": str(model_dir) if model_dir else None,
                    "reason": None if model_dir else "no tokenizer found: token ids are shown"}
        return {"loaded": self._tokenizer is not None, "source": str(self._source) if self._source else None,
                "reason": self._why_not}
