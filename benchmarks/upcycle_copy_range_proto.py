"""Prototype (evidence for docs/benchmarks.md, not a moekit feature): an exact Mixtral upcycle that
copies every tensor which is a verbatim source tensor (experts, attention, norms, embeddings) with
os.copy_file_range, in the kernel as `cp` does; only the router rows go through Python.

    .venv/bin/python benchmarks/upcycle_copy_range_proto.py SRC_FOLDER OUT_FOLDER N_EXPERTS

Only the model.safetensors shard(s) are written (no config, side files, moekit.json, hashes); they
are byte-identical to `moekit upcycle SRC OUT -n N -k 2` (check with `cmp`). Relies on moekit
internals (SafetensorsCheckpoint._where) of commit f53711a.
"""

import os
import re
import resource
import sys
import time
from pathlib import Path

t0 = time.perf_counter()
import torch

from moekit.checkpoint import open_checkpoint
from moekit.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE, plan_shards
from moekit.surgery.upcycle import plan_upcycle
from moekit.targets import DENSE_FFN

EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.\d+\.(w[123])\.weight")
PROJ = {"w1": "gate", "w3": "up", "w2": "down"}

t1 = time.perf_counter()
src, out, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ckpt = open_checkpoint(src)
plan = plan_upcycle(ckpt, "mixtral", n, 2)
where = ckpt._where  # name -> (file, start byte, end byte), filled by ckpt.tensors
assert all(o.meta.dtype == ckpt.meta(o.meta.name).dtype for o in plan.outputs if o.meta.name in where), "no casts"
produce = {o.meta.name: o.produce for o in plan.outputs}
shards = plan_shards([o.meta for o in plan.outputs], DEFAULT_MAX_SHARD_SIZE)
out.mkdir()
fds = {}
for shard in shards:
    with open(out / shard.file_name, "wb") as f:
        f.write(shard.header())
        f.flush()
        for meta in shard.tensors:
            m = EXPERT.fullmatch(meta.name)
            name = DENSE_FFN.format(i=int(m.group(1)), proj=PROJ[m.group(2)]) if m else meta.name
            if name in where:  # a verbatim copy of a source byte range
                file, start, end = where[name]
                sfd = fds.setdefault(file, os.open(file, os.O_RDONLY))
                while start < end:
                    start += os.copy_file_range(sfd, f.fileno(), end - start, start)
            else:  # router rows
                f.write(produce[meta.name]().contiguous().view(torch.uint8).numpy().data)
                f.flush()
t2 = time.perf_counter()
for shard in shards:
    with open(out / shard.file_name, "rb") as f:
        os.fsync(f.fileno())
t3 = time.perf_counter()
print(f"imports {t1 - t0:.2f} s  plan+copy {t2 - t1:.2f} s  fsync {t3 - t2:.2f} s  "
      f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
