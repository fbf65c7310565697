"""Jaxpr rewrites that jax keeps private: which outputs are constants, dead-code elimination, jit inlining.

`sharding.create_sharded` uses them to compile only the part of an init that the host cannot make.
They read and build jaxprs through `jax.extend.core`, jax's interface for such tools.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core

Jaxpr = jax.extend.core.Jaxpr
ClosedJaxpr = jax.extend.core.ClosedJaxpr
Literal = jax.extend.core.Literal
JIT_PRIMITIVES = ("jit", "pjit")


def constant_outputs(jaxpr: Jaxpr) -> list[Any]:
  """For each output of `jaxpr`: the scalar that fills it, where it is a literal or its broadcast; else None."""
  made_by = {id(v): eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  fills = []
  for var in jaxpr.outvars:
    eqn = made_by.get(id(var))
    if isinstance(var, Literal):
      fills.append(var.val)
    elif eqn and eqn.primitive.name == "broadcast_in_dim" and isinstance(eqn.invars[0], Literal):
      fills.append(eqn.invars[0].val)
    else:
      fills.append(None)
  return fills


def only_outputs(closed: ClosedJaxpr, keep: list[int]) -> ClosedJaxpr:
  """`closed` returning only its outputs `keep`, without the equations they do not need.

  XLA would drop those equations too, but only after jax lowered them and XLA parsed them: the
  model's forward pass, which flax's init traces, was 0.2 s of the gpt_pydocs init's start.
  jax's own dead-code elimination is private (partial_eval.dce_jaxpr), hence these few lines.
  """
  jaxpr = closed.jaxpr
  outvars = [jaxpr.outvars[i] for i in keep]
  needed = {id(v) for v in outvars if not isinstance(v, Literal)}
  eqns = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(id(v) in needed for v in eqn.outvars):
      eqns.append(eqn)
      needed.update(id(v) for v in eqn.invars if not isinstance(v, Literal))
  return ClosedJaxpr(jaxpr.replace(outvars=outvars, eqns=eqns[::-1]), closed.consts)


def inline_jits(closed: ClosedJaxpr) -> ClosedJaxpr:
  """`closed` with its nested jit calls (jax.random's `_normal`, `_uniform`, ...) replaced by their bodies.

  Other nested jaxprs (scan, cond, remat, custom derivatives) stay as they are. Tracing under
  `jax.disable_jit()` would also flatten the calls, but it runs `lax.scan` as a Python loop: an
  `nn.scan` model's parameters came out different.
  """
  constvars, consts = list(closed.jaxpr.constvars), list(closed.consts)
  eqns: list[Any] = []

  def body(jaxpr: Jaxpr, args: list[Any]) -> list[Any]:
    subst: dict[int, Any] = {id(v): a for v, a in zip(jaxpr.invars, args)}

    def read(v: Any) -> Any:
      return v if isinstance(v, Literal) else subst.get(id(v), v)

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if eqn.primitive.name in JIT_PRIMITIVES and not eqn.effects:
        inner = eqn.params["jaxpr"]
        fresh = [jax.extend.core.Var(v.aval) for v in inner.jaxpr.constvars]
        constvars.extend(fresh)
        consts.extend(inner.consts)
        callee = inner.jaxpr.replace(constvars=[], invars=[*inner.jaxpr.constvars, *inner.jaxpr.invars])
        outs = body(callee, [*fresh, *ins])
        subst.update((id(v), o) for v, o in zip(eqn.outvars, outs))
      else:
        # Fresh variables: a cached body inlined twice would otherwise define the same ones twice.
        outs = [v if isinstance(v, jax.extend.core.DropVar) else jax.extend.core.Var(v.aval) for v in eqn.outvars]
        subst.update((id(v), o) for v, o in zip(eqn.outvars, outs))
        eqns.append(eqn.replace(invars=ins, outvars=outs))
    return [read(v) for v in jaxpr.outvars]

  top = closed.jaxpr
  outvars = body(top.replace(constvars=[], invars=[*top.constvars, *top.invars]), [*top.constvars, *top.invars])
  flat = top.replace(constvars=constvars, outvars=outvars, eqns=eqns)
  return ClosedJaxpr(flat, consts)
