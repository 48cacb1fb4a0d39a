"""Data for jrft: loading, validation, tokenization, padding/packing, resumable batching, synthetic tasks.

Modules (one job each): :mod:`~jrft.data.sources` (rows from files, the hub, lists),
:mod:`~jrft.data.formats` (format detection and row validation), :mod:`~jrft.data.chat` (chat templates and
assistant masks), :mod:`~jrft.data.encode` (tokenization, BOS/EOS, over-long policy),
:mod:`~jrft.data.batching` (buckets, packing, batch layouts), :mod:`~jrft.data.iterator` (deterministic,
resumable, process-sharded iteration), :mod:`~jrft.data.pipeline` (all of it from a config),
:mod:`~jrft.data.synthetic` (the addition task of ``jrft demo``), :mod:`~jrft.data.local_tokenizer` (small
tokenizers built from strings).
"""

from jrft.data.batching import BATCH_KINDS as BATCH_KINDS
from jrft.data.batching import bucket_length as bucket_length
from jrft.data.batching import pack_first_fit as pack_first_fit
from jrft.data.chat import encode_chat as encode_chat
from jrft.data.encode import EncodeOptions as EncodeOptions
from jrft.data.encode import EncodeStats as EncodeStats
from jrft.data.encode import encode_rows as encode_rows
from jrft.data.errors import DataError as DataError
from jrft.data.formats import FORMATS as FORMATS
from jrft.data.formats import detect_format as detect_format
from jrft.data.formats import validate_rows as validate_rows
from jrft.data.iterator import BatchIterator as BatchIterator
from jrft.data.iterator import eval_batches as eval_batches
from jrft.data.local_tokenizer import train_tokenizer as train_tokenizer
from jrft.data.pipeline import Dataset as Dataset
from jrft.data.pipeline import build_dataset as build_dataset
from jrft.data.pipeline import datasets_from_config as datasets_from_config
from jrft.data.pipeline import eval_batches_from_config as eval_batches_from_config
from jrft.data.pipeline import pad_token_id as pad_token_id
from jrft.data.pipeline import train_iterator_from_config as train_iterator_from_config
from jrft.data.sources import Rows as Rows
from jrft.data.sources import load_rows as load_rows
from jrft.data.synthetic import AdditionTask as AdditionTask
from jrft.data.synthetic import arithmetic_tokenizer as arithmetic_tokenizer
from jrft.data.synthetic import write_task_files as write_task_files
