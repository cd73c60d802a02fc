"""refusal_lens: how does a chat model decide to refuse?

Layer specs -> TransformerLens hooks (:mod:`refusal_lens.hooks`), typed configs
(:mod:`refusal_lens.config`), offline model loading (:mod:`refusal_lens.models`).
"""

__version__ = "0.1.0"
