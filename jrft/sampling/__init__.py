"""jrft.sampling: batched KV-cache generation (GRPO groups) from small pure pieces.

``logits`` (temperature, top-k, top-p, min-p, sample, log-probs) -> ``decode`` (prefill, decode step) ->
``generate`` (the jitted loop, buckets, G samples per prompt) -> ``text`` (strings / chat messages in, text
out).
"""

from jrft.sampling.generate import FINISH_LENGTH as FINISH_LENGTH
from jrft.sampling.generate import FINISH_REASONS as FINISH_REASONS
from jrft.sampling.generate import FINISH_STOP as FINISH_STOP
from jrft.sampling.generate import GenerationResult as GenerationResult
from jrft.sampling.generate import Sampler as Sampler
from jrft.sampling.generate import SamplerStats as SamplerStats
from jrft.sampling.generate import bucket_length as bucket_length
from jrft.sampling.generate import finish_reason_names as finish_reason_names
from jrft.sampling.generate import generate as generate
from jrft.sampling.logits import SamplingParams as SamplingParams
from jrft.sampling.logits import logits_to_probs as logits_to_probs
from jrft.sampling.logits import process_logits as process_logits
from jrft.sampling.logits import sample as sample
from jrft.sampling.logits import select_next as select_next
from jrft.sampling.logits import token_logprob as token_logprob
from jrft.sampling.text import TextGeneration as TextGeneration
from jrft.sampling.text import decode_completions as decode_completions
from jrft.sampling.text import encode_prompt as encode_prompt
from jrft.sampling.text import generate_text as generate_text
from jrft.sampling.text import left_pad as left_pad
