"""``python -m prefuse.alignment.launch NAME``: print the path of a shipped ``accelerate launch`` config."""

import argparse

from prefuse.alignment.launch import CONFIGS, config_path

parser = argparse.ArgumentParser(prog="python -m prefuse.alignment.launch", description=__doc__)
parser.add_argument(
    "name", choices=CONFIGS, help="ddp | fsdp2 (FSDP2 fully_shard) | zero3 (DeepSpeed ZeRO-3)"
)
print(config_path(parser.parse_args().name))
