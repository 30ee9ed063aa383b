"""The `.wandb` file format as the SDK writes it: what the reader (wandb_file.py) and both scanners (the C
`_wandb_scan.c` and `wandb_scan_fallback.py`) agree on.

A 7-byte header, then a leveldb-style log: 32 KiB blocks of fragments (CRC-32, length, type) that join into
serialised `wandb_internal.Record` messages. Plain Python.
"""

import struct

HEADER = struct.Struct("<4sHB")  # magic, version, padding
HEADER_BYTES = HEADER.size
MAGIC = (b":W&B", 0xBEE1, 0)
BLOCK = 32768  # a fragment never crosses a block; fewer than FRAG_HEADER bytes left at a block's end are padding
FRAG_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4  # fragment types

# Record oneof field numbers (wandb_internal.proto): the two the scanners decode into columns ...
HISTORY, SUMMARY = 2, 3
# ... and the kinds they hand back raw, for the reader to decode with wandb's proto classes
CONFIG, STATS, RUN, EXIT, ENVIRONMENT = 5, 7, 17, 18, 26
# how a scan ended: every record whole; the data ends inside a record (more may come); a record that can't be right
STATUS_CLEAN, STATUS_INCOMPLETE, STATUS_CORRUPT = 0, 1, 2
NOT_A_KIND = frozenset({16, 19, 200})  # Record fields that carry no record kind: control, uuid, _info

SYSTEM_KEYS = ("_step", "_timestamp", "_runtime")  # history keys that become the step, timestamp, runtime columns
HISTORY_SEPARATOR = "."  # joins a history item's nested_key parts, as the SDK names the column
SUMMARY_SEPARATOR = "\x1f"  # joins a summary item's nested_key parts; the reader splits them again
