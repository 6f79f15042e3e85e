#!/usr/bin/env bash
# Prepares what a remote H200 machine needs beside the working tree, in transfers of at most
# 64 MiB each (all git-ignored):
#   carry/p1, carry/p2  the default model's GGUF (98 MB) in two parts, and tinyshakespeare.txt in
#                       p2 when ../shared/data has it;
#   .whl                the gguf package (pure Python; the H200 image lacks it);
#   corpus parts        with CORPUS=1: the training corpus of studies/build_doc_corpus.py packed
#                       for --seq-len 2048, as one .tar.gz cut into parts of at most 14 MB, the
#                       first in carry/p1, the second in carry/p2, the rest in carry/p3, p4, ...
#                       (one pN per transfer). With each pN on the machine:
#                       mkdir -p /root/parts && cp carry/pN/corpus.tgz.part.* /root/parts/
#                       and, once all parts are there,
#                       mkdir -p /root/corpus && cat /root/parts/corpus.tgz.part.* | tar xzf - -C /root/corpus
# On the machine, with carry/p1 there: `mkdir -p /root/gguf && cp carry/p1/gguf* /root/gguf/`;
# then, with carry/p2 and .whl there:
#   cat /root/gguf/gguf.part.aa carry/p2/gguf.part.ab > /root/gguf/model.gguf
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site MLA_EXT_DEFAULT_GGUF=/root/gguf/model.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
gguf=$($PY -c "from mla_ext.models import default_model_file; print(default_model_file())")
rm -rf carry/p[0-9]* .whl
mkdir -p carry/p1 carry/p2 .whl
split -b 50000000 "$gguf" carry/p1/gguf.part.
mv carry/p1/gguf.part.ab carry/p2/
if [ -f ../shared/data/tinyshakespeare.txt ]; then cp ../shared/data/tinyshakespeare.txt carry/p2/; fi
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl gguf
if [ "${CORPUS:-0}" = 1 ]; then
  tmp=$(mktemp -d)
  $PY studies/build_doc_corpus.py --out "$tmp/corpus"
  $PY -m mla_ext.cli pack --data "$tmp/corpus" --out "$tmp/packed" --seq-len 2048
  tar czf - -C "$tmp/packed" . | split -b 14000000 - "$tmp/corpus.tgz.part."
  n=1
  for part in "$tmp"/corpus.tgz.part.*; do mkdir -p "carry/p$n"; mv "$part" "carry/p$n/"; n=$((n + 1)); done
  rm -rf "$tmp"
fi
md5sum "$gguf"
ls -l carry/p* .whl
