"""Without Triton (macOS, Windows, CPU images) the package imports and every public function
runs on CPU; backend="triton" says what is missing. The reference imports only torch."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from entropy_kernels import advantages
from entropy_kernels.reference import advantages as reference_advantages

REPO = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter where every import of triton fails, as if it were not installed.
WITHOUT_TRITON = textwrap.dedent(
    """
    import sys

    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("triton is blocked for this test")
            return None

    sys.meta_path.insert(0, NoTriton())

    import torch
    import entropy_kernels as ek
    from entropy_kernels import reference

    B, T, V, G = 4, 3, 11, 2
    logits = torch.randn(B, T, V, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    logp, entropy = ek.logprobs_and_entropy(logits, tokens)
    (logp.sum() + entropy.sum()).backward()
    advantages = ek.grpo_advantages(rewards, G)
    token_advantages = ek.gtpo_advantages(rewards, entropy, mask, G)
    sequence_advantages = ek.grpo_s_advantages(rewards, entropy, mask, G)
    outputs = [
        ek.policy_loss(logits, tokens, advantages, mask, old_logprobs=logp.detach()),
        ek.PolicyLoss(clip_high=0.28)(logits, tokens, token_advantages, mask),
        ek.gtpo_loss(logits, tokens, rewards, mask, G),
        ek.grpo_s_loss(logits, tokens, rewards, mask, G, old_entropy=entropy.detach()),
        ek.GTPOLoss()(logits, tokens, rewards, mask, G),
        ek.GRPOSLoss()(logits, tokens, rewards, mask, G),
    ]
    for out in outputs:
        out.loss.backward()
        assert torch.isfinite(out.loss), out
    want = reference.gtpo_advantages(rewards, entropy, mask, G)
    torch.testing.assert_close(token_advantages.double(), want, rtol=1e-5, atol=1e-5)
    errors = 0
    for call in (
        lambda: ek.logprobs_and_entropy(logits, tokens, backend="triton"),
        lambda: ek.grpo_advantages(rewards, G, backend="triton"),
        lambda: ek.gtpo_loss(logits, tokens, rewards, mask, G, backend="triton"),
    ):
        try:
            call()
        except ValueError as error:
            assert "needs the triton package" in str(error), error
            errors += 1
    assert errors == 3
    assert not [name for name in sys.modules if name.split(".")[0] == "triton"]
    print("ok")
    """
)


def test_package_works_without_triton():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_import_does_not_load_triton():
    code = (
        "import sys, entropy_kernels; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_reference_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for path in sorted((REPO / "entropy_kernels" / "reference").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:  # within the reference package itself
                    assert node.module is None or "." not in node.module, (path, node.module)
                    assert (path.parent / f"{node.module}.py").exists(), (path, node.module)
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, (path.name, roots)


def test_reference_option_values_match_the_library():
    """The reference restates the spec's option values instead of importing them."""
    for name in ("NORMALIZE_MODES", "SCOPES", "GRPO_SCALES", "WHITENING_EPS"):
        assert getattr(reference_advantages, name) == getattr(advantages, name), name
