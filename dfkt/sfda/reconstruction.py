"""What the data-based SFDA methods (family ``reconstruction``) share: the DFKD synthesizers, pointed at the
frozen source model.

A reconstruction method adapts like the other SFDA methods (``SFDAMethod``: target loader, backbone and
bottleneck trained, head frozen, SHOT's schedule, dropout off) and also reconstructs source-like data from
the source model with one of DFKD's synthesizers (``dfkt.distill``: ``PixelSynthesizer``,
``GeneratorSynthesizer``; the one BN hook ``core.hooks.BNStatsRecorder``). :func:`synth_env` is the bridge:
the source model plays the DFKD teacher, the adapted model the student.
"""
from __future__ import annotations


from ..core.method import freeze
from ..distill.synthesis import SynthEnv, Synthesizer
from .common import SFDAMethod


def synth_env(method: SFDAMethod, batch: int | None = None) -> SynthEnv:
    """The synthesis environment of an SFDA run: teacher = the frozen source model (``ctx.teacher``),
    student = the model being adapted, options = the method's, synthesized batch = the target batch."""
    ctx = method.ctx
    return SynthEnv(ctx=ctx, teacher=freeze(ctx.teacher.eval()), student=method.net, learner=ctx.learner,
                    opts=method.opts, batch=batch or ctx.batch_per_rank, method=method.name,
                    progress=method.progress, lr_factor=lambda *a, **k: 1.0,
                    discard_student_grads=lambda: method.optimizer.zero_grad(set_to_none=True))


def setup_synthesizer(method: SFDAMethod, synth: Synthesizer, batch: int | None = None) -> Synthesizer:
    """Set ``synth`` up on the run's :func:`synth_env` and track it (resume restores its state)."""
    synth.setup(synth_env(method, batch))
    method.track("synthesizer", synth)
    return synth


