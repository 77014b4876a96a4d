"""Student and teacher weights over one transformer.

* LoRA: two peft adapters on one frozen base, ``student`` (trainable) and ``teacher`` (its EMA),
  both kept in fp32 whatever the base dtype; the teacher starts equal to the student.
* Full fine-tuning: the transformer itself is the student (fp32 master weights); the teacher is a
  separate no-grad copy in the model dtype, refreshed from an fp32 EMA master that can live on the
  CPU (``dopsd.ema_on_cpu``).
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch

from dopsd_fast.algorithm import ema_update_
from dopsd_fast.errors import ConfigError
from dopsd_fast.fsdp import as_dtensor, full_to_local, is_dtensor, local

log = logging.getLogger(__name__)

STUDENT, TEACHER = "student", "teacher"


class StudentTeacher:
    def __init__(self, transformer: torch.nn.Module, lora_cfg, targets, model_dtype: torch.dtype,
                 ema_on_cpu: bool = False):
        self.lora = bool(lora_cfg.enabled)
        self.transformer = transformer
        self.ema_on_cpu = ema_on_cpu
        self.sharded = False  # FSDP2 (dopsd_fast.fsdp): parameters are DTensor shards
        if self.lora:
            from peft import LoraConfig

            self.lora_config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, target_modules=list(targets),
                                          init_lora_weights=(lora_cfg.init if lora_cfg.init == "gaussian" else True))
            with warnings.catch_warnings():  # two adapters on one model is the point here
                warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
                try:
                    transformer.add_adapter(self.lora_config, adapter_name=STUDENT)
                except ValueError as e:  # peft: a name that matches nothing, or a module a LoRA cannot adapt
                    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
                    raise ConfigError(f"lora.targets {list(targets)}: {first}; name linear layers of this transformer "
                                      "(e.g. to_q, to_k, to_v), or leave lora.targets unset for the family's "
                                      "default") from None
                transformer.add_adapter(self.lora_config, adapter_name=TEACHER)
            self._student = {n: p for n, p in transformer.named_parameters() if f".{STUDENT}." in n and "lora_" in n}
            self._teacher = {n.replace(f".{STUDENT}.", f".{TEACHER}."): None for n in self._student}
            params = dict(transformer.named_parameters())
            self._teacher = {n: params[n] for n in self._teacher}
            if not self._student:
                raise ConfigError(f"lora.targets {list(targets)} matched no module of the transformer")
            if isinstance(lora_cfg.targets, (list, tuple)):  # the user's own list: say what of it matched nothing
                names = [n for n, _ in transformer.named_modules()]
                unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
                if unmatched:
                    log.warning("lora.targets: %s match no module of the transformer (the others do: trained)",
                                unmatched)
            with torch.no_grad():
                for p in list(self._student.values()) + list(self._teacher.values()):
                    p.data = p.data.float()
                for (ns, ps), (nt, pt) in zip(self._student.items(), self._teacher.items()):
                    pt.copy_(ps)  # the teacher starts as the student (= the base when B = 0)
            self.teacher_module = transformer
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
            self._set(STUDENT)
            for p in self._student.values():  # the student's flags, once (the switches leave them)
                p.requires_grad_(True)
        else:
            transformer.float().requires_grad_(True)
            self._student = dict(transformer.named_parameters())
            self.teacher_module = copy.deepcopy(transformer).to(model_dtype).requires_grad_(False).eval()
            ema_device = "cpu" if ema_on_cpu else next(transformer.parameters()).device
            self._ema = {n: p.detach().float().to(ema_device).clone() for n, p in self._student.items()}
            tparams = dict(self.teacher_module.named_parameters())
            self._teacher = {n: tparams[n] for n in self._student}
        for p in self._teacher.values():
            p.requires_grad_(False)

    # ---- selection ---------------------------------------------------------------------------
    def _set(self, name: str) -> None:
        # The active adapter of each LoRA layer, set directly: peft's ``set_adapter`` (the model's or a
        # layer's) also marks the active adapter trainable, which the teacher's never is, and walks
        # every adapter's parameters to do it; four switches per step made that ~9 % of a toy step on
        # the CPU. Where the layers lack the attribute (another peft), the layers' own call, then the
        # student's and teacher's flags set back.
        if all(m.active_adapters == [name] for m in self._tuner_layers):
            return
        if all(hasattr(m, "_active_adapter") for m in self._tuner_layers):
            for m in self._tuner_layers:
                m._active_adapter = [name]
            return
        for m in self._tuner_layers:
            m.set_adapter(name)
        # peft marks the active adapter trainable: the student alone ever is.
        for p in self._student.values():
            p.requires_grad_(True)
        for p in self._teacher.values():
            p.requires_grad_(False)

    def student(self) -> torch.nn.Module:
        if self.lora:
            self._set(STUDENT)
        return self.transformer

    def teacher(self) -> torch.nn.Module:
        if self.lora:
            self._set(TEACHER)
            return self.transformer
        return self.teacher_module

    # ---- parameters --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._student.values())

    def named_trainable(self) -> dict:
        return dict(self._student)

    def named_teacher(self) -> dict:
        """The teacher's weights as saved: the EMA adapter (LoRA) or the fp32 EMA master (full fine-tuning;
        under FSDP2 as DTensors over this rank's shards)."""
        if self.lora:
            return dict(self._teacher)
        if self.sharded:
            return {n: as_dtensor(e, self._student[n]) for n, e in self._ema.items()}
        return dict(self._ema)

    def adopt_sharding(self) -> None:
        """After FSDP2 replaced the parameters by sharded DTensors: read them again; the fp32 EMA master
        (full fine-tuning) becomes this rank's shard of each tensor (the EMA update is then local)."""

        params = dict(self.transformer.named_parameters())
        if self.lora:
            self._student = {n: params[n] for n in self._student}
            self._teacher = {n: params[n] for n in self._teacher}
        else:
            self._student = params
            tparams = dict(self.teacher_module.named_parameters())
            self._teacher = {n: tparams[n] for n in self._student}
            self._ema = {n: local(p).detach().float().to("cpu" if self.ema_on_cpu else local(p).device).clone()
                         for n, p in self._student.items()}
        for p in self._teacher.values():
            p.requires_grad_(False)
        self.sharded = True

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        students = [local(p) for p in self._student.values()]
        if self.lora:
            ema_update_([local(p) for p in self._teacher.values()], students, decay)
        else:
            ema_update_(self._ema.values(), students, decay)
            if decay != 1.0:
                self.sync_teacher()

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Full fine-tuning: copy the fp32 EMA master into the teacher module the forward reads (after
        an EMA update, a load, or any direct write to ``named_teacher()``). LoRA: nothing to do."""

        if not self.lora:
            for n, t in self._teacher.items():
                lt = local(t)
                lt.copy_(self._ema[n].to(lt.device, lt.dtype))

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        def keep(p):  # DTensor shards stay where they are (the checkpoint writer gathers nothing)
            p = p.detach()  # a copy the training goes on without touching: .cpu() of a GPU tensor is one already
            return p.clone() if is_dtensor(p) or p.device.type == "cpu" else p.cpu()

        return {
            "student": {n: keep(p) for n, p in self._student.items()},
            "teacher": {n: keep(p) for n, p in self.named_teacher().items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Full tensors (or a same-layout state) into the live weights; sharded weights take their shard."""

        for which, target in (("student", self._student), ("teacher", self.named_teacher())):
            src = state[which]
            if set(src) != set(target):
                raise ValueError(f"checkpoint {which} weights do not match this model "
                                 f"({len(set(src) ^ set(target))} names differ)")
            for n, p in target.items():
                s = src[n]
                if not (torch.is_tensor(s) and s.is_floating_point()) or tuple(s.shape) != tuple(p.shape):
                    what = f"{s.dtype} {tuple(s.shape)}" if torch.is_tensor(s) else f"a {type(s).__name__}"
                    raise ValueError(f"checkpoint {which} weight {n} is {what}, this model's is floating-point "
                                     f"{tuple(p.shape)}")
                if is_dtensor(p) and not is_dtensor(s):
                    piece = full_to_local(s, p)
                    dst = self._ema[n] if which == "teacher" and not self.lora else p.to_local()
                    dst.copy_(piece.to(dst.device, dst.dtype))
                else:
                    p.copy_(s.to(p.device, p.dtype))
        self.sync_teacher()

    def lora_state_dict(self, which: str = STUDENT) -> dict:
        """peft-format LoRA weights of one adapter, adapter name stripped (what diffusers saves)."""
        if not self.lora:
            raise ValueError("lora_state_dict: this run is full fine-tuning (lora.enabled=false)")
        from peft.utils import get_peft_model_state_dict


        sd = get_peft_model_state_dict(self.transformer, adapter_name=which)
        # sharded (dist.shard_base): gathered, a collective every rank takes part in
        return {k: (v.full_tensor() if is_dtensor(v) else v).detach().cpu().contiguous() for k, v in sd.items()}

    def lora_metadata(self) -> dict:
        cfg = self.lora_config.to_dict()
        cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else None
        return {k: v for k, v in cfg.items() if k in ("r", "lora_alpha", "target_modules", "use_dora", "lora_bias")}
