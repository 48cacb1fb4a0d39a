"""jrft.models: the flax.nnx decoder (Llama, Qwen2, Qwen3, Gemma 1), its KV cache and transformers
checkpoint I/O."""

from jrft.models.config import FAMILIES as FAMILIES
from jrft.models.config import ModelConfig as ModelConfig
from jrft.models.decoder import Decoder as Decoder
from jrft.models.decoder import KVCache as KVCache
from jrft.models.decoder import ScalarHead as ScalarHead
from jrft.models.decoder import init_cache as init_cache
from jrft.models.decoder import positions_from_mask as positions_from_mask
from jrft.models.layers import REMAT_POLICIES as REMAT_POLICIES
from jrft.models.pretrained import CheckpointError as CheckpointError
from jrft.models.pretrained import from_pretrained as from_pretrained
from jrft.models.pretrained import save_pretrained as save_pretrained
