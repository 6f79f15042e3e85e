"""Whether a converted (and recovered) instruct model still answers as its original does.

The check of a recovery fine-tune (``check_recovery``, ``mla-ext check-recovery``):
- **answers**: the model and the original answer the ten ``DEMO_PROMPTS`` greedily
  (``ANSWER_TOKENS`` new tokens at most, ``eval.chat_answers``); it passes with the same
  answer as the original on at least ``MIN_MATCHES`` of them. Two answers are the same when
  they are equal after stripping surrounding white space (exact), or when their first
  sentences are equal after ``normalise_answer`` (normalised);
- **perplexity**: the model's held-out perplexity is at most ``MAX_PPL_RATIO`` times that of the
  original fine-tuned on the same tokens (``baseline``).

The demo prompts are general questions with short answers, none of them built from the training
corpus, so the check measures whether the assistant behaviour carried over, not recall of the
training answers.
"""
from __future__ import annotations

import re
import unicodedata

DEMO_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "What is 2 + 3? Answer with a number.",
    "How many days are in a week? Answer in one sentence.",
    "What is the opposite of hot? Answer in one word.",
    "What is the chemical symbol for water? Answer in one sentence.",
    "Name the first month of the year.",
    "What is the largest ocean on Earth? Answer in one sentence.",
    "How many legs does a spider have? Answer in one sentence.",
    "What language is spoken in Spain? Answer in one word.",
    "What is the boiling point of water in Celsius? Answer in one sentence.",
)
MIN_MATCHES = 8
MAX_PPL_RATIO = 1.3
ANSWER_TOKENS = 48
ARTICLES = {"a", "an", "the"}
# a sentence ends at . ! ? followed by white space or the end ("149.7" goes on), or at a line
# break
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def first_sentence(text: str) -> str:
    """``text`` up to the end of its first sentence (its first non-empty line at most)."""
    text = text.strip()
    match = _SENTENCE_END.search(text)
    return text[:match.start()] if match else text


def normalise_answer(text: str) -> str:
    """The first sentence of an answer, Unicode NFKC, lower case, punctuation removed, the
    articles a/an/the dropped and white space collapsed: "The capital of France is Paris." and
    "the capital of France is Paris!" normalise alike, "Paris." does not."""
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a str, got {type(text).__name__}")
    sentence = unicodedata.normalize("NFKC", first_sentence(text)).lower()
    sentence = "".join(" " if unicodedata.category(c).startswith("P") else c for c in sentence)
    return " ".join(w for w in sentence.split() if w not in ARTICLES)


def answers_match(answer: str, reference: str) -> bool:
    """Exact (white space around them aside) or normalised (``normalise_answer``) equality;
    an answer that normalises to nothing matches only exactly."""
    if answer.strip() == reference.strip():
        return True
    normalised = normalise_answer(answer)
    return bool(normalised) and normalised == normalise_answer(reference)


def _check_prompts(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    return prompts


def compare_answers(answers, reference_answers, prompts=DEMO_PROMPTS) -> dict:
    """{"rows": [{prompt, reference, answer, match}], "matches", "total"} of two answer lists."""
    prompts = _check_prompts(prompts)
    answers, reference_answers = list(answers), list(reference_answers)
    if not len(answers) == len(reference_answers) == len(prompts):
        raise ValueError(f"{len(prompts)} prompts need as many answers and reference answers, "
                         f"got {len(answers)} and {len(reference_answers)}")
    rows = [{"prompt": p, "reference": r, "answer": a, "match": answers_match(a, r)}
            for p, a, r in zip(prompts, answers, reference_answers)]
    return {"rows": rows, "matches": sum(r["match"] for r in rows), "total": len(rows)}


def check_recovery(model, tokenizer, *, original=None, original_answers=None, baseline=None,
                   text=None, prompts=DEMO_PROMPTS, min_matches: int = MIN_MATCHES,
                   max_ppl_ratio: float = MAX_PPL_RATIO, max_new_tokens: int = ANSWER_TOKENS,
                   cache_dtype: str | None = None, context: int = 512,
                   eval_tokens: int | None = None, batch_size: int = 16,
                   progress: bool = False) -> dict:
    """Check a recovered model against its original (module docstring).

    original / original_answers: the original model (answers generated here) or its answers to
    ``prompts`` (e.g. computed once for several models). baseline: the original fine-tuned on the
    same tokens; with it the perplexities of ``text`` (default: the held-out part of
    pydoc_data.topics; windows of ``context``, the first ``eval_tokens`` tokens) are compared,
    without it only the answers are. cache_dtype: the converted model's latent cache format for
    the answers (default: each layer's stored format). Returns {"answers": compare_answers(...), "min_matches", "answers_pass",
    "perplexity": {"model", "baseline", "ratio", "max_ratio"} or None, "ppl_pass", "passed"}."""
    from .data import default_evaluation_text
    from .eval import chat_answers, perplexity

    prompts = _check_prompts(prompts)
    if (original is None) == (original_answers is None):
        raise ValueError("give exactly one of original (the model) and original_answers")
    if isinstance(min_matches, bool) or not isinstance(min_matches, int) \
            or not 1 <= min_matches <= len(prompts):
        raise ValueError(f"min_matches must be an int in 1..{len(prompts)} (the prompts), got "
                         f"{min_matches!r}")
    if not max_ppl_ratio > 0:
        raise ValueError(f"max_ppl_ratio must be positive, got {max_ppl_ratio!r}")
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    if original is not None:
        original_answers = chat_answers(original, tokenizer, prompts, **kwargs)
    answers = chat_answers(model, tokenizer, prompts, cache_dtype=cache_dtype, **kwargs)
    compared = compare_answers(answers, original_answers, prompts)
    result = {"answers": compared, "min_matches": min_matches,
              "answers_pass": compared["matches"] >= min_matches, "perplexity": None,
              "ppl_pass": None}
    if baseline is not None:
        text = default_evaluation_text() if text is None else text
        ppl = {name: perplexity(m, tokenizer, text, context=context, stride=context,
                                max_tokens=eval_tokens, progress=progress)
               for name, m in (("model", model), ("baseline", baseline))}
        ppl.update(ratio=ppl["model"] / ppl["baseline"], max_ratio=max_ppl_ratio)
        result["perplexity"] = ppl
        result["ppl_pass"] = ppl["ratio"] <= max_ppl_ratio
    result["passed"] = result["answers_pass"] and result["ppl_pass"] is not False
    return result


def format_report(result: dict) -> str:
    """The check as lines of text: each prompt's two answers, then the verdicts."""
    lines = []
    for r in result["answers"]["rows"]:
        lines += [f"[{'same' if r['match'] else 'DIFFERENT'}] {r['prompt']}",
                  f"    original: {r['reference'] or '(empty)'}",
                  f"    model:    {r['answer'] or '(empty)'}"]
    a = result["answers"]
    lines.append(f"answers as the original on {a['matches']} of {a['total']} prompts (needs "
                 f"{result['min_matches']}): {'pass' if result['answers_pass'] else 'FAIL'}")
    ppl = result["perplexity"]
    if ppl is not None:
        lines.append(f"perplexity {ppl['model']:.3f} against {ppl['baseline']:.3f} for the "
                     f"original fine-tuned on the same tokens: {ppl['ratio']:.3f}x (at most "
                     f"{ppl['max_ratio']}x): {'pass' if result['ppl_pass'] else 'FAIL'}")
    lines.append("recovery check: " + ("PASSED" if result["passed"] else "FAILED"))
    return "\n".join(lines)
