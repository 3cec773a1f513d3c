"""The pieces of the tiny CLIP's training that make relation captions learnable."""
import torch

from tinyworld.clip import (N_LAYOUT, ClipTrainConfig, LayoutAxes, clip_loss, layout_targets, make_clip,
                                      sincos_positions)
from tinyworld.grammar import parse
from tinyworld.render import render_batch
from tinyworld.tokenizer import build_tokenizer


def test_sincos_positions_encode_column_and_row():
    grid, width = 8, 96
    table = sincos_positions(grid, width)
    assert table.shape == (1 + grid * grid, width)
    assert torch.all(table[0] == 0)  # the class token has no position
    patches = table[1:].view(grid, grid, width)  # (row, column, channel)
    half = width // 2
    # x channels depend on the column only, y channels on the row only
    assert torch.allclose(patches[0, :, :half], patches[5, :, :half])
    assert torch.allclose(patches[:, 0, half:], patches[:, 5, half:])
    # every patch has its own code
    flat = patches.reshape(grid * grid, width)
    distances = torch.cdist(flat, flat) + torch.eye(grid * grid)
    assert distances.min() > 1e-3


def test_make_clip_starts_from_the_sincos_table():
    tok = build_tokenizer()
    cfg = ClipTrainConfig(vision_width=64, vision_layers=1, text_width=32, text_layers=1)
    weight = make_clip(tok, cfg).vision_model.embeddings.position_embedding.weight
    assert torch.equal(weight.detach(), sincos_positions(64 // cfg.patch_size, cfg.vision_width))
    plain = make_clip(tok, ClipTrainConfig(**{**cfg.__dict__, "sincos_positions": False}))
    assert not torch.equal(plain.vision_model.embeddings.position_embedding.weight.detach(), weight.detach())


def test_layout_axes_are_orthonormal_and_read_in_scale_units():
    probe = LayoutAxes(64, scale=0.15, seed=3)
    assert probe.axes.shape == (N_LAYOUT, 64)
    assert torch.allclose(probe.axes @ probe.axes.T, torch.eye(N_LAYOUT), atol=1e-5)
    facts = torch.randn(5, N_LAYOUT)
    emb = 0.15 * facts @ probe.axes  # an embedding that holds exactly these facts on the axes
    assert torch.allclose(probe(emb), facts, atol=1e-5)
    assert list(probe.parameters()) == []  # fixed, not learnt


def test_layout_targets_sides_are_order_free():
    a, b = layout_targets([parse("a red circle to the left of a blue square"),
                           parse("a blue square to the right of a red circle")])
    assert torch.equal(a[0], a[1]) and torch.equal(b[0], b[1])
    flipped, _ = layout_targets([parse("a red circle to the right of a blue square")])
    side = slice(2 * 6, None)
    assert torch.equal(flipped[0, side], -a[0, side]) and a[0, side].abs().sum() == 2


def test_text_margin_term_only_acts_above_the_margin():
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = make_clip(tok, ClipTrainConfig(vision_width=32, vision_layers=1, text_width=32, text_layers=1))
    scenes = [parse("a red circle to the left of a blue square"), parse("two green triangles")]
    images = render_batch(scenes, seed=0)
    captions = [s.to_text() for s in scenes]
    negatives = [["a red circle to the right of a blue square"], ["three green triangles"]]
    plain = clip_loss(model, tok, images, captions, negatives)
    # cosines never exceed 1, so a margin of 1 adds nothing; a margin of -1 adds mean(cos + 1) > 0
    assert torch.allclose(clip_loss(model, tok, images, captions, negatives, text_margin=1.0), plain)
    with torch.no_grad():
        txt = model.get_text_features(**tok(captions + [n[0] for n in negatives], padding=True,
                                            return_tensors="pt")).pooler_output
    txt = torch.nn.functional.normalize(txt, dim=-1)
    expected = ((txt[0] @ txt[2] + 1) + (txt[1] @ txt[3] + 1)) / 2
    added = clip_loss(model, tok, images, captions, negatives, text_margin=-1.0) - plain
    assert torch.allclose(added, expected, atol=1e-5)
