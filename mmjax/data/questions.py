"""The text modality of mm_arith: paraphrased questions that name the operation.

The question says which operation to apply and nothing about the digits, so text alone
(or text with one other modality) is at chance. Every template fits in 46 bytes, so with
begin/end tokens a 48-token text tower never truncates the operation away.
"""
from __future__ import annotations

OPS = ("plus", "minus")

TEMPLATES = {
    "plus": (
        "written plus spoken?",
        "what is the written digit plus the spoken one?",
        "add the spoken digit to the written one",
        "sum of the written and spoken digits?",
        "written digit + spoken digit = ?",
        "the digit you see plus the one you hear",
    ),
    "minus": (
        "written minus spoken?",
        "what is the written digit minus the spoken one",
        "subtract the spoken digit from the written one",
        "written digit less the spoken digit?",
        "written digit - spoken digit = ?",
        "the digit you see minus the one you hear",
    ),
}
MAX_BYTES = 46


def question(op: str, template_id: int) -> str:
  return TEMPLATES[op][template_id % len(TEMPLATES[op])]


def apply_op(a: int, b: int, op: str) -> int:
  return (a + b) % 10 if op == "plus" else (a - b) % 10
