"""Exit head: costeff kernel vs eager ([pooler linear], tanh, classifier linear, log_softmax entropy,
threshold compare) vs torch.compile of the same. 2 classes, CLS states [batch, hidden]."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import _harness as hz
from costeff.ops import exit_head, exit_head_reference

BENCH = "exit_head"
CLASSES = 2


def eager_exit_head(hidden, classifier_weight, classifier_bias, threshold: float, pooler_weight=None, pooler_bias=None):
    h = F.linear(hidden, pooler_weight, pooler_bias) if pooler_weight is not None else hidden
    logits = F.linear(torch.tanh(h), classifier_weight, classifier_bias)
    log_p = F.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logits, entropy, entropy < threshold


def compare(out, ref):
    logits, entropy, exit_mask = out
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, ref.entropy, atol=1e-5, rtol=1e-4)
    # The exit decision must agree wherever the entropy is not within rounding of the threshold.
    clear = (ref.entropy - THRESHOLD).abs() > 1e-5
    assert torch.equal(exit_mask[clear], ref.exit_mask[clear]), "exit decisions differ from the reference"


THRESHOLD = 0.4


def make_cases(quick: bool) -> list[hz.Case]:
    gen = torch.Generator().manual_seed(0)
    hiddens = (384,) if quick else (384, 256)
    batches = (1, 32) if quick else (1, 8, 32)
    cases = []
    for h, pooler, batch in itertools.product(hiddens, (False, True), batches):
        args = [
            torch.randn(batch, h, generator=gen),
            torch.randn(CLASSES, h, generator=gen) / h**0.5 * 3,
            torch.randn(CLASSES, generator=gen) * 0.1,
            THRESHOLD,
        ]
        if pooler:
            args += [torch.randn(h, h, generator=gen) / h**0.5, torch.randn(h, generator=gen) * 0.1]
        cases.append(
            hz.Case(
                label=f"h{h} c{CLASSES} {'pooler' if pooler else 'no-pooler'} b{batch}",
                shape=dict(hidden=h, classes=CLASSES, pooler=pooler, batch=batch),
                args=tuple(args),
                candidates={
                    "costeff": exit_head,
                    "eager": eager_exit_head,
                    "compile": hz.compiled(eager_exit_head),
                },
                reference=exit_head_reference,
                compare=compare,
            )
        )
    return cases


def main(argv=None):
    return hz.main_for(BENCH, __doc__, make_cases, argv)


if __name__ == "__main__":
    main()
