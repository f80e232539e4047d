"""The classifier head: model-parallel Partial FC, its single-process reference,
checkpoint sharding and a memory/traffic planner."""
from dpface.heads.full_fc import FullFC
from dpface.heads.partial_fc import HeadOutput, PartialFC
from dpface.heads.plan import format_plan, plan
from dpface.heads.sharding import (
                                   apply_shard_state,
                                   class_range,
                                   head_shard_state,
                                   load_resharded,
                                   merge_shards,
                                   save_head_shard,
                                   shard_filename,
)

__all__ = ["PartialFC", "FullFC", "HeadOutput", "class_range", "head_shard_state",
           "save_head_shard", "load_resharded", "apply_shard_state", "merge_shards",
           "shard_filename", "plan", "format_plan"]
