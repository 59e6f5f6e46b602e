"""Soft actor-critic (Haarnoja, Zhou, Abbeel, Levine 2018, arXiv 1801.01290; automatic temperature from
"Soft Actor-Critic Algorithms and Applications", Haarnoja et al. 2018, arXiv 1812.05905), and SAC+ERA
(Kang, Liao, Xu, Xu 2025, arXiv 2510.08549).

:class:`SAC` holds the networks and performs one gradient update on a replay minibatch; the Lightning glue
(env stepping, replay, logging, checkpoints) is :class:`entreg.modules.sac.SACModule`.

One update, in the order of Stable-Baselines3's SAC so that a side-by-side run is like for like:

1. a ~ pi(.|s) (reparameterised), with log pi(a|s);
2. temperature: J(log alpha) = -mean(log alpha * (log pi(a|s) + H_target)), H_target = -dim(A), with
   alpha = exp(log alpha) read *before* this step for the losses below (``temperature_entropy="gaussian"``:
   the Gaussian's entropy before squashing in place of -log pi, the quantity ERA sets);
3. critics: y = r + gamma (1 - terminated) (min_i Q'_i(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s'),
   L = 0.5 sum_i mean((Q_i(s, a_replay) - y)^2); steps 2 and 3 share one optimizer step (their gradients are
   independent, so this equals SB3's two steps);
4. actor: L = mean(alpha log pi(a|s) - min_i Q_i(s, a)) with the critics just updated (their weights detached,
   so no critic gradient is computed);
5. Polyak averaging of the target critics, Q' <- (1 - tau) Q' + tau Q (one fused ``_foreach_lerp_``).

The temperature rule is kept here rather than in :class:`entreg.callbacks.EntropyController`: the controller
steps a coefficient from a closed-form categorical entropy read off a module's outputs once per optimizer step,
whereas SAC's dual ascent must run inside every gradient update on the sampled estimate -log pi of a
tanh-squashed Gaussian (no closed form), with Adam on log alpha as in the reference implementations; the
controller's rule with ``kp=0`` is the same dual-ascent idea, in linear rather than log space.

SAC+ERA (``era`` given): the actor's log-std comes from :class:`entreg.nn.GaussianERA`, so the Gaussian's
entropy equals the ERA target in every state (higher only where a log-std hits its floor); there is no
temperature and no entropy term in either loss (y = r + gamma (1 - terminated) min_i Q'_i(s', a'), actor loss
-min_i Q_i(s, a)), as in ERA's released SAC.
ERA's code samples a Gaussian centred at tanh(mean) truncated to [-1, 1] (``squash="truncated"``, our default for
ERA); the paper describes the usual tanh squashing (``squash="tanh"``) with the Gaussian's target raised by a
compensation delta >= 0 for the entropy that bounding removes. The code has no delta (our default, delta = 0);
:class:`entreg.nn.GaussianERA`'s ``delta`` and ``learn_delta`` give the paper's constant or learned delta, the latter
stepped after the actor from the batch's -mean log pi of the bounded policy. ``entropy_in_losses=True`` puts SAC's
alpha log pi terms back for an ablation.

ERA's released agent (``model=sac_era_authors``; nothingbutbut/era @ 4b7320b, ``sac-era/``) differs from SB3's SAC in
its networks and optimizers, which are options here: ``ortho_init`` (actor 512-512 ELU, orthogonal init), critics with
``critic_layer_norm`` (Dense -> LayerNorm -> ELU, orthogonal init) stepped by AdamW, ``critic_loss_weight=1`` (its
critic loss is sum_i mean((Q_i - y)^2), SB3's is half that) and ``action_bound=1 - 1e-6`` (the truncation interval).
Its update order (critics, target critics, actor) gives the same result as ours (the actor loss reads the critics,
not the targets).

Example:
    >>> sac = SAC(obs_dim=3, action_dim=2, hidden=(32, 32))
    >>> batch = ReplayBatch(torch.randn(8, 3), torch.rand(8, 2) * 2 - 1, torch.randn(8), torch.randn(8, 3),
    ...                     torch.zeros(8))
    >>> critic_opt, actor_opt = sac.optimizers(lambda params: torch.optim.Adam(params, lr=3e-4))
    >>> stats = sac.update(batch, critic_opt, actor_opt)
    >>> sorted(stats)
    ['actor_loss', 'alpha', 'critic_loss', 'gaussian_entropy', 'policy_entropy', 'q', 'std']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from entreg.entropy import gaussian_entropy
from entreg.nn.era import GaussianERA
from entreg.nn.mlp import mlp, resolve_act_layer
from entreg.nn.optim import OptimizerFactory
from entreg.rl.buffer import ReplayBatch
from entreg.rl.policies import GaussianActor, Squash

TemperatureEntropy = Literal["policy", "gaussian"]

__all__ = ["SAC", "QEnsemble", "ReplayBatch"]

LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm's default (ERA's critics); torch's is 1e-5


class QEnsemble(nn.Module):
    """``num_q`` independent MLP critics Q_i(s, a), each the ``nn.Linear`` layers of an :func:`entreg.nn.mlp.mlp`
    with the widths and initialisation of Stable-Baselines3's separate critics, or (``layer_norm``) a LayerNorm
    (epsilon 1e-6, flax's default) after every hidden linear layer, before the activation, as ERA's released critics;
    ``ortho_init``: orthogonal weights with gain sqrt(2) for every layer, the output one included, and zero biases
    (ERA's ``default_init``).

    Separate 2-D matmuls per member: on the CPU they are faster than one batched matmul over the members (whose
    backward pass copies), measured 4.2 vs 5.7 ms for a forward and backward pass of two 256-256 critics on a
    batch of 256 (one thread).

    Example:
        >>> q = QEnsemble(obs_dim=3, action_dim=2, hidden=(16, 16))
        >>> q(torch.randn(5, 3), torch.randn(5, 2)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: tuple[int, ...] = (256, 256),
        activation: str = "relu",
        num_q: int = 2,
        layer_norm: bool = False,
        ortho_init: bool = False,
    ) -> None:
        super().__init__()
        if num_q < 1 or not hidden:
            raise ValueError(f"QEnsemble needs num_q >= 1 and at least one hidden layer, got {num_q}, {hidden}")
        self.num_q = num_q
        self.activation = resolve_act_layer(activation)()
        gain = math.sqrt(2) if ortho_init else None
        self.members = nn.ModuleList(
            nn.ModuleList(m for m in mlp(obs_dim + action_dim, hidden, 1, activation, gain) if isinstance(m, nn.Linear))
            for _ in range(num_q)
        )
        self.norms = None  # LayerNorms after the hidden layers, as a separate list: `members` holds only the Linears
        if layer_norm:
            self.norms = nn.ModuleList(
                nn.ModuleList(nn.LayerNorm(width, eps=LAYER_NORM_EPS) for width in hidden) for _ in range(num_q)
            )

    def forward(self, obs: Tensor, actions: Tensor, detach_params: bool = False) -> Tensor:
        """Q-values of every member, shape (num_q, B). ``detach_params``: no gradient reaches the weights (the
        gradient with respect to ``obs`` and ``actions`` still flows)."""
        x = torch.cat([obs, actions], dim=-1)
        norms = self.norms if self.norms is not None else [None] * self.num_q
        return torch.stack(
            [self._member(layers, ln, x, detach_params) for layers, ln in zip(self.members, norms, strict=True)]
        )

    def _member(self, layers: nn.ModuleList, norms: nn.ModuleList | None, x: Tensor, detach_params: bool) -> Tensor:
        h = x
        for k, layer in enumerate(layers):
            if k:
                if norms is not None:
                    norm = norms[k - 1]
                    h = F.layer_norm(h, norm.normalized_shape, *_params(norm, detach_params), norm.eps)
                h = self.activation(h)
            h = F.linear(h, *_params(layer, detach_params))
        return h.squeeze(-1)


def _params(layer: nn.Module, detach: bool) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a Linear or LayerNorm, detached when asked."""
    weight, bias = layer.weight, layer.bias
    return (weight.detach(), bias.detach()) if detach else (weight, bias)


class SAC(nn.Module):
    """Soft actor-critic with twin critics, Polyak target critics and automatic temperature, or SAC+ERA.

    See the module docstring for the update. Defaults are Stable-Baselines3's SAC.

    Args:
        obs_dim, action_dim: sizes of the flat observation and action (actions live in [-1, 1]).
        hidden, activation: widths and activation of the actor and critic MLPs (SB3: 256-256 ReLU).
        num_q: number of critics (2: clipped double Q).
        gamma, tau: discount and Polyak coefficient.
        ent_coef: ``"auto"`` (learned alpha, initial value ``initial_alpha``) or a fixed alpha >= 0; ignored
            with ``era`` unless ``entropy_in_losses``.
        initial_alpha: initial temperature for ``"auto"`` (SB3: 1.0).
        target_entropy: H_target of the temperature rule (None: -action_dim); only with the learned temperature.
        temperature_entropy: the entropy the temperature rule holds at ``target_entropy``: ``"policy"``, the acting
            policy's -mean log pi (SAC, SB3), or ``"gaussian"``, the mean entropy of the Gaussian before squashing or
            truncation (the quantity ERA sets; ERA's third control arm). Only with the learned temperature.
        log_std_min, log_std_max: the actor's log-std clamp without ERA (SB3: -20, 2).
        era: a :class:`entreg.nn.GaussianERA` for SAC+ERA.
        squash: ``"tanh"`` or ``"truncated"`` (None: tanh for SAC, truncated for ERA, as ERA's code).
        entropy_in_losses: whether alpha log pi enters the losses (None: True for SAC, False for ERA).
        ortho_init: orthogonal initialisation of actor and critics (:class:`GaussianActor`, :class:`QEnsemble`).
        critic_layer_norm: LayerNorm after the critics' hidden layers.
        critic_loss_weight: w in L = w sum_i mean((Q_i - y)^2) (SB3: 0.5; ERA's code: 1).
        action_bound: the truncation interval [-b, b] of ``squash="truncated"`` (ERA's code: 1 - 1e-6).
        log_std_init: without ``era``, the actor's log-std in every state at initialisation (None: the head's).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: tuple[int, ...] = (256, 256),
        activation: str = "relu",
        num_q: int = 2,
        gamma: float = 0.99,
        tau: float = 0.005,
        ent_coef: str | float = "auto",
        initial_alpha: float = 1.0,
        target_entropy: float | None = None,
        log_std_min: float = -20.0,
        log_std_max: float = 2.0,
        era: GaussianERA | None = None,
        squash: Squash | None = None,
        entropy_in_losses: bool | None = None,
        ortho_init: bool = False,
        critic_layer_norm: bool = False,
        critic_loss_weight: float = 0.5,
        action_bound: float = 1.0,
        log_std_init: float | None = None,
        temperature_entropy: TemperatureEntropy = "policy",
    ) -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        auto = ent_coef == "auto"
        if not auto and not (isinstance(ent_coef, (int, float)) and ent_coef >= 0):
            raise ValueError(f"ent_coef must be 'auto' or a number >= 0, got {ent_coef!r}")
        if not initial_alpha > 0:
            raise ValueError(f"initial_alpha must be > 0, got {initial_alpha}")
        if not critic_loss_weight > 0:
            raise ValueError(f"critic_loss_weight must be > 0, got {critic_loss_weight}")
        hidden = tuple(hidden)
        self.gamma, self.tau = float(gamma), float(tau)
        self.critic_loss_weight = float(critic_loss_weight)
        self.entropy_in_losses = era is None if entropy_in_losses is None else bool(entropy_in_losses)
        self.target_entropy = float(-action_dim if target_entropy is None else target_entropy)
        squash = squash or ("tanh" if era is None else "truncated")
        self.actor = GaussianActor(
            obs_dim, action_dim, hidden, activation, log_std_min, log_std_max, era, squash, ortho_init, action_bound,
            log_std_init,
        )  # fmt: skip
        critic = (obs_dim, action_dim, hidden, activation, num_q, critic_layer_norm, ortho_init)
        self.critic = QEnsemble(*critic)
        self.critic_target = QEnsemble(*critic)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.learn_alpha = self.entropy_in_losses and auto
        if target_entropy is not None and not self.learn_alpha:
            raise ValueError(
                f"a temperature target (target_entropy={target_entropy}) needs the learned temperature: ent_coef='auto'"
                f" and the alpha log pi terms in the losses (ERA drops them unless entropy_in_losses=True), got "
                f"ent_coef={ent_coef!r}, entropy_in_losses={self.entropy_in_losses}"
            )
        if temperature_entropy not in get_args(TemperatureEntropy):
            raise ValueError(
                f"temperature_entropy must be one of {get_args(TemperatureEntropy)}, got {temperature_entropy!r}"
            )
        if temperature_entropy != "policy" and not self.learn_alpha:
            raise ValueError(
                f"temperature_entropy={temperature_entropy!r} sets the learned temperature's rule: it needs "
                f"ent_coef='auto' and the alpha log pi terms, got ent_coef={ent_coef!r}, "
                f"entropy_in_losses={self.entropy_in_losses}"
            )
        self.temperature_entropy = temperature_entropy
        alpha = initial_alpha if auto else float(ent_coef)
        log_alpha = torch.tensor(math.log(alpha) if alpha > 0 else -math.inf)
        if self.learn_alpha:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)

    @property
    def era(self) -> GaussianERA | None:
        return self.actor.era

    def optimizers(
        self, critic_factory: OptimizerFactory, actor_factory: OptimizerFactory | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """(critic optimizer, also stepping log alpha when learned, in a parameter group of its own without weight
        decay; actor optimizer) from factories ``params -> Optimizer`` (the actor's defaults to the critic's)."""
        critic_params: list[Any] = list(self.critic.parameters())
        if self.learn_alpha:
            critic_params = [{"params": critic_params}, {"params": [self.log_alpha], "weight_decay": 0.0}]
        return critic_factory(critic_params), (actor_factory or critic_factory)(self.actor.parameters())

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Actions in [-1, 1] for a batch of observations: sampled, or the mode when ``deterministic``."""
        if deterministic:
            return self.actor.mode(obs)
        return self.actor.sample(obs, generator)[0]

    def update(
        self,
        batch: ReplayBatch,
        critic_optimizer: Any,
        actor_optimizer: Any,
        generator: torch.Generator | None = None,
        backward: Callable[[Tensor], None] = Tensor.backward,
    ) -> dict[str, Tensor]:
        """One gradient update (critics and temperature, actor, target critics, and with a learned ERA delta its
        step from the batch's -mean log pi) on ``batch``; returns detached 0-dim diagnostics (no host
        synchronisation): losses, alpha, mean Q, the policy entropy estimate -mean log pi, the mean entropy of the
        Gaussian before squashing, its mean std and (with ERA) delta after the update."""
        actions_pi, log_prob, log_std = self.actor.sample(batch.obs, generator)
        gaussian = gaussian_entropy(log_std.detach())  # per state: the temperature's rule ("gaussian") and the stats
        alpha = self.log_alpha.detach().exp()
        loss = self._critic_loss(batch, alpha, generator)
        critic_loss = loss.detach()
        if self.learn_alpha:
            entropy = -log_prob.detach() if self.temperature_entropy == "policy" else gaussian
            loss = loss - (self.log_alpha * (self.target_entropy - entropy)).mean()
        critic_optimizer.zero_grad()
        backward(loss)
        critic_optimizer.step()

        q_pi = self.critic(batch.obs, actions_pi, detach_params=True).min(0).values
        actor_loss = -q_pi.mean()
        if self.entropy_in_losses:
            actor_loss = actor_loss + (alpha * log_prob).mean()
        actor_optimizer.zero_grad()
        backward(actor_loss)
        actor_optimizer.step()
        self.update_target()
        policy_entropy = -log_prob.detach().mean()
        stats = {
            "critic_loss": critic_loss,
            "actor_loss": actor_loss.detach(),
            "alpha": alpha,
            "q": q_pi.detach().mean(),
            "policy_entropy": policy_entropy,
            "gaussian_entropy": gaussian.mean(),
            "std": log_std.detach().exp().mean(),
        }
        if self.era is not None:
            if self.era.learn_delta:
                self.era.compensation_step(policy_entropy)
            stats["era_delta"] = self.era.delta.clone()
        return stats

    def _critic_loss(self, batch: ReplayBatch, alpha: Tensor, generator: torch.Generator | None) -> Tensor:
        with torch.no_grad():
            next_actions, next_log_prob, _ = self.actor.sample(batch.next_obs, generator)
            next_q = self.critic_target(batch.next_obs, next_actions).min(0).values
            if self.entropy_in_losses:
                next_q = next_q - alpha * next_log_prob
            target = batch.rewards + self.gamma * (1.0 - batch.terminated) * next_q
        q = self.critic(batch.obs, batch.actions)
        return self.critic_loss_weight * (q - target).square().mean(-1).sum()

    @torch.no_grad()
    def update_target(self) -> None:
        """Q' <- Q' + tau (Q - Q'), all tensors in one fused call."""
        torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), self.tau)
