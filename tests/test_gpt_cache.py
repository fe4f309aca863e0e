"""The KV cache: incremental, padded and cropped passes give the same hidden states as a full pass."""

import pytest
import torch

from mtp_lightning.config import load_config
from mtp_lightning.model.cp_model import CPModel


def small_model(kind="mlp"):
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.gpt.n_layer=2", "model.gpt.d_model=32", "model.gpt.n_head=4",
                                 "model.gpt.max_seq_len=64", "data.seq_len=32", f"model.heads.kind={kind}", "spec.every_n_val=0",
                                 "model.heads.rank=2", "model.heads.n_future=3"])
    cfg.model.gpt.vocab_size = 40
    return CPModel(cfg.model).eval()


@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_incremental_equals_full_pass(kind):
    model = small_model(kind)
    idx = torch.randint(0, 40, (2, 12))
    z_full, st_full = model(idx)
    cache = model.new_cache(2, 32)
    outs = [model.extend(idx[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 12))]
    z_inc = torch.cat([o[0] for o in outs], 1)
    torch.testing.assert_close(z_inc, z_full, atol=1e-5, rtol=1e-5)
    for s in range(3):
        torch.testing.assert_close(torch.cat([o[1][s] for o in outs], 1), st_full[s], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [12, 12]


def test_left_padding_does_not_change_a_row():
    model = small_model("block")
    a, b = torch.randint(0, 40, (1, 7)), torch.randint(0, 40, (1, 4))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])  # (2, 7)
    pad_mask = torch.ones(2, 7, dtype=torch.bool)
    pad_mask[1, :3] = False
    cache = model.new_cache(2, 32)
    z, _ = model.extend(padded, cache, pad_mask)
    z_b, _ = model(b)
    torch.testing.assert_close(z[1, 3:], z_b[0], atol=1e-5, rtol=1e-5)
    nxt = torch.randint(0, 40, (2, 2))
    z2, _ = model.extend(nxt, cache)
    z_b2, _ = model(torch.cat([b, nxt[1:]], 1))
    torch.testing.assert_close(z2[1], z_b2[0, -2:], atol=1e-5, rtol=1e-5)


def test_crop_rows_to_different_lengths_then_continue():
    model = small_model("block")
    idx = torch.randint(0, 40, (2, 10))
    cache = model.new_cache(2, 32)
    model.extend(idx, cache)
    cache.crop(torch.tensor([6, 9]))  # row 0 rejects 4 tokens, row 1 rejects 1
    nxt = torch.randint(0, 40, (2, 3))
    z, _ = model.extend(nxt, cache)
    for row, keep in ((0, 6), (1, 9)):
        ref, _ = model(torch.cat([idx[row:row + 1, :keep], nxt[row:row + 1]], 1))
        torch.testing.assert_close(z[row], ref[0, -3:], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [9, 12]


def test_full_cache_is_refused():
    model = small_model()
    cache = model.new_cache(1, 8)
    model.extend(torch.randint(0, 40, (1, 8)), cache)
    with pytest.raises(ValueError, match="full"):
        model.extend(torch.randint(0, 40, (1, 1)), cache)
