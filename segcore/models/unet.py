"""UNet for semantic segmentation (Ronneberger et al., 2015), fully convolutional, in 2-D or 3-D.

Encoder: ``depth`` stages of (conv3x3-BN-ReLU) x 2 followed by 2x2 max-pooling; a bottleneck
block; decoder: 2x2 transposed-convolution upsampling, concatenation with the matching skip
connection, (conv3x3-BN-ReLU) x 2; a 1x1 head to ``num_classes`` logits.

One implementation for images and volumes: ``spatial_dims=2`` builds ``Conv2d``/``BatchNorm2d``/
``ConvTranspose2d`` layers for ``(N, C, H, W)`` images (the registry's ``unet``), ``spatial_dims=3``
their ``3d`` counterparts (3x3x3 kernels, 2x2x2 pooling and upsampling) for ``(N, C, D, H, W)``
volumes (``unet3d``). The state dict's keys do not depend on ``spatial_dims``.

Any size works: the input is padded (reflect) to a multiple of ``2**depth`` on every spatial
axis (:class:`~segcore.models.padding.PaddedForward`) and the logits are cropped back, so the
output always has the input's spatial size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcore.models.padding import PaddedForward

#: ``spatial_dims -> (convolution, batch norm, transposed convolution)``.
_LAYERS = {
    2: (nn.Conv2d, nn.BatchNorm2d, nn.ConvTranspose2d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.ConvTranspose3d),
}


class _ConvBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, spatial_dims: int = 2) -> None:
        conv, norm, _ = _LAYERS[spatial_dims]
        super().__init__(
            conv(in_ch, out_ch, 3, padding=1, bias=False),
            norm(out_ch),
            nn.ReLU(inplace=True),
            conv(out_ch, out_ch, 3, padding=1, bias=False),
            norm(out_ch),
            nn.ReLU(inplace=True),
        )


class UNet(PaddedForward, nn.Module):
    """UNet mapping ``(N, in_channels, H, W)`` float images (``spatial_dims=2``) or
    ``(N, in_channels, D, H, W)`` float volumes (``spatial_dims=3``) to ``(N, num_classes, H, W)``
    or ``(N, num_classes, D, H, W)`` logits.

    Channel widths double at each stage: ``base, 2*base, ..., base * 2**depth`` (bottleneck).
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 2, base: int = 16, depth: int = 4,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or base < 1 or depth < 1 or spatial_dims not in _LAYERS:
            raise ValueError(
                f"UNet needs in_channels >= 1, num_classes >= 2 (background included), base >= 1, depth >= 1, "
                f"spatial_dims 2 or 3; got in_channels={in_channels}, num_classes={num_classes}, base={base}, "
                f"depth={depth}, spatial_dims={spatial_dims}"
            )
        conv, _, up_conv = _LAYERS[spatial_dims]
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.spatial_dims = spatial_dims
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        ch = in_channels
        for w in widths[:-1]:
            self.down.append(_ConvBlock(ch, w, spatial_dims))
            ch = w
        self.bottleneck = _ConvBlock(ch, widths[-1], spatial_dims)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(up_conv(w_in, w_out, 2, stride=2))
            self.dec.append(_ConvBlock(2 * w_out, w_out, spatial_dims))
        self.head = conv(widths[0], num_classes, 1)

    @property
    def divisor(self) -> int:
        """Spatial sizes are padded internally to a multiple of this."""
        return int(2**self.depth)

    @property
    def input_multiple(self) -> int:  # type: ignore[override]
        return self.divisor

    def forward_unpadded(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an input whose spatial sizes are multiples of :attr:`divisor` (``forward`` pads any other)."""
        pool = F.max_pool3d if self.spatial_dims == 3 else F.max_pool2d
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = pool(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)
