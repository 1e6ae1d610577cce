"""Distillation losses that need no vocabulary map: ULD (sorted probabilities) and ALM (chunk likelihoods).

Both compare a student with a teacher whose tokenizer may differ, using only what fusedata stores:

- ULD (universal logit distillation, Boizard et al. 2024) compares the two next-token distributions
  as *sorted* probability vectors, so which id carries which probability does not matter. From a
  stored top-k the teacher is known as its k largest probabilities and the mass t outside them, so
  the loss is the L1 (= the optimal-transport distance ULD uses) between the student's and the
  teacher's (k + 1)-bucket sorted vectors: Σ_i |p_(i) − q_(i)| + |t_p − t_q|.
- ALM (approximate likelihood matching, tokenkit) cuts the text into byte chunks on which both
  tokenisations have a boundary; a chunk's likelihood is the product of its tokens' gold
  probabilities under each model. The loss is the *binary* KL between the two chunk probabilities,
  each read as a Bernoulli (the chunk comes next, or not):
      KL(p_t ‖ p_s) = p_t log(p_t / p_s) + (1 − p_t) log((1 − p_t) / (1 − p_s)).
  Why binary KL: it is 0 exactly when the student gives the chunk the teacher's probability and
  grows with the gap either way, its gradient in the student's chunk log-likelihood is bounded,
  (p_s − p_t) / (1 − p_s), and it does not explode on chunks both models find unlikely, which a
  squared log-ratio does (those tiny probabilities carry no information). It is the binary
  cross-entropy tokenkit uses minus the teacher's own binary entropy (the same gradient; 0 at a
  match, so it reads as a divergence). A temperature τ divides both log-likelihoods first, as
  tokenkit's binarisation temperature: τ > 1 lifts the chunk probabilities towards 1, where the
  (1 − p) side of the Bernoulli carries the comparison.
"""

from __future__ import annotations

import math
from typing import Any


def uld_loss(student_logp: Any, teacher_q: Any, teacher_tail: Any) -> Any:
    """ULD summed over positions.

    student_logp float [N, V]: the student's log-softmax; teacher_q float [N, k]: the stored top-k
    probabilities (0 on padding entries), in any order; teacher_tail float [N]: the teacher's mass
    outside them. The student is cut to its own k largest probabilities plus their tail.
    """
    import torch

    k = teacher_q.shape[-1]
    student_top = torch.exp(student_logp.topk(k, dim=-1).values)  # [N, k] sorted descending
    teacher_top = teacher_q.sort(dim=-1, descending=True).values  # [N, k]
    student_tail = (1.0 - student_top.sum(-1)).clamp(min=0.0)  # [N]
    return ((student_top - teacher_top).abs().sum(-1) + (student_tail - teacher_tail).abs()).sum()


def log1mexp(x: Any) -> Any:
    """log(1 − exp(x)) for x < 0, accurate on both sides of log ½ (x = 0 gives −inf)."""
    import torch

    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binary_kl(teacher_ll: Any, student_ll: Any, temperature: float = 1.0, eps: float = 1e-6) -> Any:
    """Elementwise KL(Bernoulli(p_t) ‖ Bernoulli(p_s)) with p = exp(ll / τ); ll float [C] <= 0.

    Log-likelihoods are capped at −eps so a chunk of probability 1 keeps a finite (1 − p) side."""
    import torch

    lt = (teacher_ll / temperature).clamp(max=-eps)
    ls = (student_ll / temperature).clamp(max=-eps)
    pt = torch.exp(lt)
    return pt * (lt - ls) + (1 - pt) * (log1mexp(lt) - log1mexp(ls))


def alm_loss(token_ll: Any, chunk_of: Any, teacher_ll: Any, temperature: float = 1.0) -> Any:
    """ALM summed over chunks.

    token_ll float [N]: the student's log p(gold token) per position; chunk_of long [N]: the chunk
    each position belongs to (−1: in none); teacher_ll float [C]: each chunk's log-likelihood under
    the teacher (from its stored gold log-probs). The student's chunk log-likelihood is the sum of
    its positions' log p(gold).
    """
    import torch

    inside = chunk_of >= 0  # [N]
    student_ll = torch.zeros_like(teacher_ll).index_add(0, chunk_of[inside], token_ll[inside])  # [C]
    return binary_kl(teacher_ll, student_ll, temperature).sum()
