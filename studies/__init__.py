"""Quality and fine-tuning studies of the conversion; their results are in studies/results."""
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
