"""The proof machinery's seeds: fresh ones, or the one pinned with `pytest --proof-seed SEED`."""

import kernel_proofs


def test_seeds_are_fresh_unless_pinned(monkeypatch):
    monkeypatch.setattr(kernel_proofs, "PINNED_SEED", None)
    assert kernel_proofs.fresh_seed() != kernel_proofs.fresh_seed()
    monkeypatch.setattr(kernel_proofs, "PINNED_SEED", 1234)
    assert kernel_proofs.fresh_seed() == kernel_proofs.fresh_seed() == 1234


def test_the_command_line_option_is_what_the_proofs_use(request):
    assert kernel_proofs.PINNED_SEED == request.config.getoption("--proof-seed")
