"""UNet for semantic segmentation (Ronneberger et al., 2015), fully convolutional.

Encoder: ``depth`` stages of (conv3x3-BN-ReLU) x 2 followed by 2x2 max-pooling; a bottleneck
block; decoder: 2x2 transposed-convolution upsampling, concatenation with the matching skip
connection, (conv3x3-BN-ReLU) x 2; a 1x1 head to ``num_classes`` logits.

Any H x W works: the input is padded (reflect) to a multiple of ``2**depth`` and the logits
are cropped back, so the output always has the input's spatial size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcore.models.padding import PaddedForward


class _ConvBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class UNet(PaddedForward, nn.Module):
    """UNet mapping ``(N, in_channels, H, W)`` float images to ``(N, num_classes, H, W)`` logits.

    Channel widths double at each stage: ``base, 2*base, ..., base * 2**depth`` (bottleneck).
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 2, base: int = 16, depth: int = 4) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or base < 1 or depth < 1:
            raise ValueError(
                f"UNet needs in_channels >= 1, num_classes >= 2 (background included), base >= 1, depth >= 1; "
                f"got in_channels={in_channels}, num_classes={num_classes}, base={base}, depth={depth}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        ch = in_channels
        for w in widths[:-1]:
            self.down.append(_ConvBlock(ch, w))
            ch = w
        self.bottleneck = _ConvBlock(ch, widths[-1])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose2d(w_in, w_out, 2, stride=2))
            self.dec.append(_ConvBlock(2 * w_out, w_out))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @property
    def divisor(self) -> int:
        """Spatial sizes are padded internally to a multiple of this."""
        return int(2**self.depth)

    @property
    def input_multiple(self) -> int:  # type: ignore[override]
        return self.divisor

    def forward_unpadded(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an input whose H and W are multiples of :attr:`divisor` (``forward`` pads any other)."""
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)
