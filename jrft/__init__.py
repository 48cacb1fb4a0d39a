"""jrft: JAX Reinforcement Fine-Tuning.

SFT, reward modelling, PPO (RLHF), DPO and GRPO for causal language models in JAX/Flax.
Subpackages: ``jrft.losses`` (pure loss functions), ``jrft.models`` (flax.nnx decoder and
transformers checkpoint I/O), ``jrft.parallel`` (meshes and sharding rules), ``jrft.sampling``
(batched KV-cache generation), ``jrft.rewards`` (host-side reward functions), ``jrft.data``,
``jrft.train``.
"""

__version__ = "0.1.0"
