"""PyTorch references for benchmarks/cpu_vs_torch.py: a nanoGPT-style GPT and the cnn_digits CNN.

The same architectures, initialisation, optimizer and clipping as jaxcollab's `gpt` and `cnn`
models under experiments/gpt_pydocs.py and experiments/cnn_digits.py, written the way a PyTorch
user would (nanoGPT's model.py; the PyTorch mnist example), run in eager mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
  """nanoGPT's attention: one qkv matmul, scaled_dot_product_attention(is_causal=True)."""

  def __init__(self, embed_dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
    self.out = nn.Linear(embed_dim, embed_dim)

  def forward(self, x_BxLxD: torch.Tensor) -> torch.Tensor:
    B, L, D = x_BxLxD.shape
    q, k, v = self.qkv(x_BxLxD).split(D, dim=2)
    q, k, v = (t.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.transpose(1, 2).contiguous().view(B, L, D))


class Block(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)), GELU (tanh) in the MLP."""

  def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int):
    super().__init__()
    self.ln1, self.ln2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
    self.attn = CausalSelfAttention(embed_dim, num_heads)
    self.fc, self.proj = nn.Linear(embed_dim, mlp_dim), nn.Linear(mlp_dim, embed_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln1(x))
    return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
  """Token + learned position embeddings, pre-LN blocks, final LayerNorm, head tied to the embedding."""

  def __init__(self, vocab_size: int, num_layers: int, num_heads: int, embed_dim: int, mlp_dim: int, context: int):
    super().__init__()
    self.token_embed = nn.Embedding(vocab_size, embed_dim)
    self.position_embed = nn.Parameter(torch.zeros(context, embed_dim))
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_dim) for _ in range(num_layers)])
    self.ln_f = nn.LayerNorm(embed_dim)
    # GPT-2 init, as jaxcollab's: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 layers)), zero biases.
    for name, p in self.named_parameters():
      if p.dim() >= 2:
        std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("out.weight", "proj.weight")) else 0.02
        nn.init.normal_(p, std=std)
      elif "ln" not in name:
        nn.init.zeros_(p)

  def forward(self, tokens_BxL: torch.Tensor) -> torch.Tensor:
    L = tokens_BxL.shape[1]
    x = self.token_embed(tokens_BxL) + self.position_embed[:L]
    for block in self.blocks:
      x = block(x)
    return self.ln_f(x) @ self.token_embed.weight.T


class CNN(nn.Module):
  """cnn_digits: [conv3x3 -> relu -> avgpool2] x 2 -> dense 256 -> relu -> 10 classes, LeCun-normal init."""

  def __init__(
    self,
    features: tuple[int, ...] = (32, 64),
    dense: int = 256,
    image_size: int = 8,
    channels: int = 1,
    num_classes: int = 10,
  ):
    super().__init__()
    convs, c = [], channels
    for f in features:
      convs.append(nn.Conv2d(c, f, 3, padding=1))
      c = f
    self.convs = nn.ModuleList(convs)
    side = image_size // 2 ** len(features)
    self.dense, self.head = nn.Linear(c * side * side, dense), nn.Linear(dense, num_classes)
    for m in self.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        nn.init.trunc_normal_(
          m.weight,
          std=1 / math.sqrt(fan_in) / 0.87962566103423978,
          a=-2 / math.sqrt(fan_in) / 0.87962566103423978,
          b=2 / math.sqrt(fan_in) / 0.87962566103423978,
        )
        nn.init.zeros_(m.bias)

  def forward(self, images_BxCxHxW: torch.Tensor) -> torch.Tensor:
    x = images_BxCxHxW
    for conv in self.convs:
      x = F.avg_pool2d(F.relu(conv(x)), 2)
    return self.head(F.relu(self.dense(x.flatten(1))))


def gpt_optimizer(model: GPT, lr: float, weight_decay: float, b2: float) -> torch.optim.Optimizer:
  """AdamW with decay on matrices only (as jaxcollab's optim.decay_mask), nanoGPT's configure_optimizers."""
  decay = [p for p in model.parameters() if p.dim() >= 2]
  rest = [p for p in model.parameters() if p.dim() < 2]
  return torch.optim.AdamW(
    [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, b2)
  )


def gpt_train_step(
  model: GPT, opt: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor, clip: float
) -> torch.Tensor:
  """One step: next-token cross-entropy, backward, global-norm clipping, AdamW update."""
  logits = model(inputs)
  loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
  opt.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
  opt.step()
  return loss


def cnn_train_step(model: CNN, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """One step: cross-entropy, backward, Adam update."""
  loss = F.cross_entropy(model(images), labels)
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  return loss
