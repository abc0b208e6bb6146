"""zimage_export.omni_pack (the packing the runtime ports, sdk/src/model/omni.rs): the quirks
of diffusers' patchify_and_embed_omni it must keep, on small hand-checked inputs."""

import numpy as np

from zimage_export.omni_pack import pack_batch, pack_item, target_output


def item(caps=(5, 3), latent_hw=((4, 6), (2, 2)), grids=((2, 3),), channels=2):
    rng = np.random.default_rng(0)
    segments = [rng.standard_normal((n, 4)).astype(np.float32) for n in caps]
    latents = [rng.standard_normal((channels, h, w)).astype(np.float32) for h, w in latent_hw]
    sigs = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in grids] + [None]
    noise = [0] * len(grids) + [1]
    return pack_item(segments, latents, sigs, noise, 2), segments, latents, sigs


def test_caption_positions_shift_by_the_previous_segments_padding():
    packed, *_ = item()
    feats, pos, pad, noisy, _ = packed["cap"]
    assert len(feats) == 64  # two segments, each padded to 32
    # Segment 0: 5 tokens at 1..5, its 27 pad tokens continue the grid at 6..32.
    assert pos[:32, 0].tolist() == list(range(1, 33))
    # Segment 1 takes the rows after segment 0's grid: segment 0's 27 zero pad rows, then its
    # own grid from cu = 1 + 5 + 2 = 8.
    assert pos[32:59].tolist() == [[0, 0, 0]] * 27
    assert pos[59:64, 0].tolist() == [8, 9, 10, 11, 12]
    assert pad[:5] == [False] * 5 and all(pad[5:32]) and pad[32:35] == [False] * 3
    # Segment 0 belongs to the reference (clean), segment 1 to the target (noisy).
    assert noisy[:32] == [0] * 32 and noisy[32:] == [1] * 32


def test_image_positions_and_siglip_scaling():
    packed, _, latents, sigs = item()
    _, x_pos, x_pad, x_noisy, _ = packed["x"]
    # Reference at the first segment's end (6), target at the second's (8 + 3 = 11).
    assert x_pos[0].tolist() == [6, 0, 0] and x_pos[5].tolist() == [6, 1, 2]
    assert x_pos[32].tolist() == [11, 0, 0]
    assert x_noisy[:32] == [0] * 32 and x_noisy[32:] == [1] * 32
    s_feats, s_pos, s_pad, _, s_valid = packed["siglip"]
    # The 2x3 grid is scaled onto the 4x6 latent: rows 0, 3; columns 0, 2 (2.5 truncated), 5.
    assert s_pos[:6].tolist() == [[7, 0, 0], [7, 0, 2], [7, 0, 5], [7, 3, 0], [7, 3, 2], [7, 3, 5]]
    # permute(2, 0, 1).reshape(H*W, C): the channel-major buffer read in rows of C.
    assert np.array_equal(s_feats[:6], sigs[0].transpose(2, 0, 1).reshape(6, 3))
    assert all(s_pad[6:]) and len(s_feats) == 64  # 32 for the reference, 32 pad for the target
    assert all(s_valid)


def test_no_condition_image_has_no_vision_tokens():
    """Omni text-to-image: one caption segment, noisy (diffusers' mask past the last image is
    1), the target alone, and a vision stream whose one block is invalid everywhere (the graph
    needs a token; attention masks it out)."""
    rng = np.random.default_rng(1)
    segment = rng.standard_normal((7, 4)).astype(np.float32)
    latent = rng.standard_normal((2, 4, 6)).astype(np.float32)
    packed = pack_item([segment], [latent], None, [1], 2, siglip_dim=3)
    _, cap_pos, _, cap_noisy, cap_valid = packed["cap"]
    assert cap_noisy == [1] * 32 and all(cap_valid)
    assert cap_pos[:7, 0].tolist() == list(range(1, 8))
    _, x_pos, _, x_noisy, _ = packed["x"]
    assert x_pos[0].tolist() == [8, 0, 0] and x_noisy == [1] * 32  # at the segment's end, 1 + 7
    s_feats, _, s_pad, _, s_valid = packed["siglip"]
    assert s_feats.shape == (32, 3) and all(s_pad) and not any(s_valid)
    feeds = pack_batch([packed, packed], [0.3, 0.3])
    assert feeds["siglip_feats"].shape == (2, 32, 3) and not feeds["siglip_valid"].any()
    assert feeds["x_valid"].all()


def test_batch_padding_and_target_output_roundtrip():
    a, _, latents, _ = item(caps=(5, 3))
    b, *_ = item(caps=(5, 40))
    feeds = pack_batch([a, b], [0.5, 0.5])
    assert feeds["cap_feats"].shape == (2, 32 + 64, 4)
    assert feeds["cap_valid"][0].sum() == 64 and feeds["cap_valid"][1].all()
    # The target's tokens come back as its latents when the graph is the identity on x tokens.
    out = target_output(feeds["x_tokens"][0], latents, 2)
    assert np.array_equal(out, latents[-1])
