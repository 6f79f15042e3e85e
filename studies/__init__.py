"""Quality and fine-tuning studies of the conversion; their results are in studies/results."""
import argparse
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_evaluation_args(p: argparse.ArgumentParser) -> None:
    """The options the fine-tuning studies share: calibration, the held-out perplexity (pydoc
    and Shakespeare), the device and the progress bars. check_evaluation_args checks them."""
    from mla_ext.train.cli import positive_int

    p.add_argument("--calib-sequences", type=positive_int, default=64,
                   help="calibration sequences of 512 tokens (default 64)")
    p.add_argument("--eval-tokens", type=positive_int, default=None,
                   help="first tokens of the held-out pydoc text evaluated (default: all)")
    p.add_argument("--shakespeare", type=Path, default=None,
                   help="tinyshakespeare.txt (default: ../shared/data/tinyshakespeare.txt when "
                        "present, else pydoc only)")
    p.add_argument("--shakespeare-tokens", type=positive_int, default=65536,
                   help="first tokens of Shakespeare evaluated (default 65536)")
    p.add_argument("--context", type=positive_int, default=512,
                   help="perplexity window and stride (default 512)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_evaluation_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.shakespeare is not None and not args.shakespeare.is_file():
        p.error(f"--shakespeare {args.shakespeare} is not a file")
