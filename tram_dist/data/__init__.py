"""M2D2 data for causal-LM fine-tuning: sources, token cache, blocks, global batch order.

    from tram_dist.data import resolve_source, load_tokenizer, TokenCache, train_blocks, \\
        eval_blocks, TrainLoader, EvalLoader
    source = resolve_source(data_dir=None, hub=False)        # embedded corpus by default
    tok = load_tokenizer("tiny")                               # or "gpt2" / a local folder
    cache = TokenCache(tok, cache_dir)
    train = TrainLoader(train_blocks(source, cache, "math", 128), global_batch_size=16,
                        micro_batch_size=4, seed=0)            # rank/world from torch.distributed
    for micro_batches in train: ...                            # this rank's share of one step
    valid = EvalLoader(eval_blocks(source, cache, "math", "valid", 128), batch_size=8)

Every user-fixable problem raises `DataError` (a ValueError) with a one-line message; data
that is used but altered (invalid UTF-8) gets one `DataWarning` line per file.
"""
from .blocks import IGNORE_INDEX, EvalBlocks, TrainBlocks, collate
from .distributed import dist_info, run_once
from .errors import DataError, DataWarning
from .m2d2 import (EMBEDDED_CORPUS, EMBEDDED_TOKENIZER, M2D2_REPO, S2ORC_DOMAINS, SPLITS,
                   WIKI_DOMAINS, DataSource, HubSource, LocalSource, default_cache_dir,
                   embedded_source, iter_lines, read_lines, resolve_source, safe_extract)
from .sampler import (DataPosition, EvalLoader, GlobalBatchSampler, TrainLoader, batch_layout,
                      rank_share)
from .tokens import TokenCache, file_sha256, load_tokenizer, tokenize_file, tokenizer_fingerprint


def train_blocks(source: DataSource, cache: TokenCache, domain: str, block_size: int,
                 split: str = "train") -> TrainBlocks:
    """Training blocks of `domain` (tail dropped)."""
    return TrainBlocks(cache.tokens(source, domain, split), block_size, name=f"{domain}/{split}")


def eval_blocks(source: DataSource, cache: TokenCache, domain: str, split: str,
                block_size: int) -> EvalBlocks:
    """Evaluation blocks of `domain`'s `split`: every token but the first scored once."""
    tok = cache.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return EvalBlocks(cache.tokens(source, domain, split), block_size, pad_id=pad,
                      name=f"{domain}/{split}")


__all__ = [
    "DataError", "DataWarning", "DataSource", "LocalSource", "HubSource", "resolve_source", "embedded_source",
    "default_cache_dir", "safe_extract", "iter_lines", "read_lines", "SPLITS", "M2D2_REPO",
    "WIKI_DOMAINS", "S2ORC_DOMAINS", "EMBEDDED_CORPUS", "EMBEDDED_TOKENIZER",
    "load_tokenizer", "tokenizer_fingerprint", "file_sha256", "tokenize_file", "TokenCache",
    "TrainBlocks", "EvalBlocks", "collate", "IGNORE_INDEX", "train_blocks", "eval_blocks",
    "DataPosition", "GlobalBatchSampler", "TrainLoader", "EvalLoader", "batch_layout",
    "rank_share", "dist_info", "run_once",
]
