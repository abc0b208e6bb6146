"""Packing of Omni-mode transformer inputs into the tensors transformer_omni.onnx takes: the
executable description of what sdk/src/model/omni.rs does (verify.py checks the pair against
diffusers' forward). Mirrors diffusers' patchify_and_embed_omni, including two of its quirks
that decide parity:

- a caption segment of L tokens padded to P = ceil32(L) gets positions for L + P tokens from
  its coordinate grid AND P more (0, 0, 0) rows for its pad, i.e. L + 2(P - L) rows; the rows
  of one item's segments are concatenated and the tokens take them in order, so from the
  second segment on a caption token's position is shifted by the previous segments' padding;
- a SigLIP grid [H, W, C] is flattened with permute(2, 0, 1).reshape(H*W, C) (channels and
  tokens mixed), and its positions are scaled to the latent grid in float32 then truncated.

Items of a batch are padded at the end of each stream ("valid" false).
"""

import numpy as np

SEQ = 32


def pad_len(n: int) -> int:
    return (-n) % SEQ


def pack_item(cap_segments, latents, siglips, noise_mask, patch, siglip_dim=None):
    """One batch item. cap_segments: list of [L_j, D] arrays; latents: list of [C, H, W] arrays
    (conditions, then the target); siglips: list of [H, W, C] arrays or None, one per latent, or
    None for no vision stream at all (Omni text-to-image: diffusers passes no SigLIP features
    without condition images); noise_mask: one 0/1 per latent. Returns per-stream tuples of
    numpy arrays (feats, pos, pad, noisy, valid).

    The graph's attention needs at least one token per stream, so "no vision stream" is one
    block of `siglip_dim`-wide tokens that are all invalid: every attention masks them out as
    keys, so the caption and image tokens come out as without them (ONNX Runtime's CPU
    attention gives a fully masked row finite values; checked by verify.py against diffusers'
    forward without SigLIP features)."""
    cap_rows, cap_pos, cap_pad, cap_noisy, cap_end = [], [], [], [], []
    cu = 1
    for j, seg in enumerate(cap_segments):
        n, p = len(seg), pad_len(len(seg))
        noise = noise_mask[j] if j < len(noise_mask) else 1
        cap_rows.append(np.concatenate([seg, np.repeat(seg[-1:], p, 0)]) if p else seg)
        grid = np.stack([np.arange(cu, cu + n + p), np.zeros(n + p, int), np.zeros(n + p, int)], -1)
        cap_pos.append(np.concatenate([grid, np.zeros((p, 3), int)]))  # L + 2P rows (see above)
        cap_pad += [False] * n + [True] * p
        cap_noisy += [noise] * (n + p)
        cu += n
        cap_end.append(cu)
        cu += 2
    cap_feats = np.concatenate(cap_rows)
    cap_pos = np.concatenate(cap_pos)[: len(cap_feats)]

    x_rows, x_pos, x_pad, x_noisy, sizes = [], [], [], [], []
    for j, lat in enumerate(latents):
        c, h, w = lat.shape
        ht, wt = h // patch, w // patch
        tokens = lat.reshape(c, ht, patch, wt, patch).transpose(1, 3, 2, 4, 0).reshape(ht * wt, patch * patch * c)
        n, p = ht * wt, pad_len(ht * wt)
        rows, cols = np.meshgrid(np.arange(ht), np.arange(wt), indexing="ij")
        pos = np.stack([np.full(n, cap_end[j]), rows.ravel(), cols.ravel()], -1)
        x_rows.append(np.concatenate([tokens, np.repeat(tokens[-1:], p, 0)]) if p else tokens)
        x_pos.append(np.concatenate([pos, np.zeros((p, 3), int)]))
        x_pad += [False] * n + [True] * p
        x_noisy += [noise_mask[j]] * (n + p)
        sizes.append((h, w))

    if siglips is None:
        return {
            "x": (np.concatenate(x_rows), np.concatenate(x_pos), x_pad, x_noisy, [True] * len(x_pad)),
            "cap": (cap_feats, cap_pos, cap_pad, cap_noisy, [True] * len(cap_pad)),
            "siglip": (np.zeros((SEQ, siglip_dim), np.float32), np.zeros((SEQ, 3), int), [True] * SEQ, [1] * SEQ,
                       [False] * SEQ),
        }
    s_rows, s_pos, s_pad, s_noisy = [], [], [], []
    dim = next(s.shape[2] for s in siglips if s is not None)
    for j, sig in enumerate(siglips):
        if sig is None:
            s_rows.append(np.zeros((SEQ, dim), np.float32))
            s_pos.append(np.zeros((SEQ, 3), int))
            s_pad += [True] * SEQ
            s_noisy += [noise_mask[j]] * SEQ
            continue
        sh, sw, sc = sig.shape
        flat = np.ascontiguousarray(sig.transpose(2, 0, 1)).reshape(sh * sw, sc)
        n, p = sh * sw, pad_len(sh * sw)
        rows, cols = np.meshgrid(np.arange(sh), np.arange(sw), indexing="ij")
        pos = np.stack([np.full(n, cap_end[j] + 1), rows.ravel(), cols.ravel()], -1)
        pos = np.concatenate([pos, np.zeros((p, 3), int)])
        h, w = sizes[j]
        scaled = pos.astype(np.float32)
        scaled[:, 1] = scaled[:, 1] / np.float32(max(sh - 1, 1)) * np.float32(h - 1)
        scaled[:, 2] = scaled[:, 2] / np.float32(max(sw - 1, 1)) * np.float32(w - 1)
        s_rows.append(np.concatenate([flat, np.repeat(flat[-1:], p, 0)]) if p else flat)
        s_pos.append(scaled.astype(np.int64))
        s_pad += [False] * n + [True] * p
        s_noisy += [noise_mask[j]] * (n + p)

    return {
        "x": (np.concatenate(x_rows), np.concatenate(x_pos), x_pad, x_noisy, [True] * len(x_pad)),
        "cap": (cap_feats, cap_pos, cap_pad, cap_noisy, [True] * len(cap_pad)),
        "siglip": (np.concatenate(s_rows), np.concatenate(s_pos), s_pad, s_noisy, [True] * len(s_pad)),
    }


def pack_batch(items, timestep) -> dict:
    """items: pack_item results. Returns the graph's inputs by name."""
    feeds = {"timestep": np.asarray(timestep, np.float32)}
    names = {"x": "x_tokens", "cap": "cap_feats", "siglip": "siglip_feats"}
    for stream, feat_name in names.items():
        length = max(len(item[stream][0]) for item in items)
        dim = items[0][stream][0].shape[1]
        b = len(items)
        feats = np.zeros((b, length, dim), np.float32)
        pos = np.zeros((b, length, 3), np.int64)
        pad = np.zeros((b, length), bool)
        noisy = np.zeros((b, length), bool)
        valid = np.zeros((b, length), bool)
        for i, item in enumerate(items):
            f, p, pd, nz, ok = item[stream]
            n = len(f)
            feats[i, :n], pos[i, :n], pad[i, :n], noisy[i, :n], valid[i, :n] = f, p, pd, np.asarray(nz) == 1, ok
        feeds[feat_name] = feats
        feeds[f"{stream}_pos"], feeds[f"{stream}_pad"] = pos, pad
        feeds[f"{stream}_noisy"], feeds[f"{stream}_valid"] = noisy, valid
    return feeds


def target_output(x_out: np.ndarray, latents, patch: int) -> np.ndarray:
    """The target's [C, H, W] from one item's x_out row ([S_x, p*p*C]): the last latent's tokens."""
    offset = sum(lat.shape[1] // patch * (lat.shape[2] // patch) + pad_len(lat.shape[1] // patch * (lat.shape[2] // patch))
                 for lat in latents[:-1])
    c, h, w = latents[-1].shape
    ht, wt = h // patch, w // patch
    tokens = x_out[offset : offset + ht * wt]
    return tokens.reshape(ht, wt, patch, patch, c).transpose(4, 0, 2, 1, 3).reshape(c, h, w)
