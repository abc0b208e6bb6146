"""The arithmetic of Winograd F(4x4, 3x3) in plain Python: the transform matrices, their forms
on flattened tiles, and which convolutions qualify. winograd.py builds the graph's layers from
these; tests/test_winograd.py checks them against direct convolution with numpy."""

# Default threshold: 3x3 convolutions with at least this many input and output channels are
# computed by Winograd (winograd.py has the timings that put it here). export.py passes
# --winograd-min-channels.
DEFAULT_MIN_CHANNELS = 256

# F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2 and infinity: a 6x6 input tile d and a
# 3x3 kernel g give the 4x4 output tile A_T [(G g G^T) * (B_T d B_T^T)] A_T^T.
B_T = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
A_T = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]


def two_d(matrix: list[list[float]]) -> list[list[float]]:
    """The 2-D transform X -> M X M^T of a tile as one matrix acting on the tile flattened row
    by row: kron(M, M), whose entry (i n + k, j n + l) is M[i][j] M[k][l]."""
    return [[a * b for a in row_i for b in row_k] for row_i in matrix for row_k in matrix]


def qualifies(conv, min_channels: int) -> bool:
    """Whether F(4x4, 3x3) computes this convolution (anything with nn.Conv2d's attributes): a
    3x3 kernel, stride 1, zero padding 1, no dilation or groups, and at least `min_channels`
    input and output channels."""
    return (
        conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels >= min_channels
        and conv.out_channels >= min_channels
    )
