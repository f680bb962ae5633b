#!/usr/bin/env bash
# The published RWKV-vs-FLA study's run script (YS-Tang/RWKV-FLA-comparison, demo-training-run.sh), rewritten to
# call this harness with the same hyper-parameters: L12 D768 head 64, ctx 512, micro bsz 48, 1 GPU, DeepSpeed
# ZeRO-2, bf16, grad_cp 1, lr 6e-4 -> 6e-5 cosine over MiniPile's 1498226207 tokens (so it barely decays in 2000
# steps), warm-up 10, betas 0.9/0.99, eps 1e-18, weight decay 0.001, grad clip 1, 2000 steps.
#
#   train-temp/demo-training-run.sh ARM [RECIPE] [extra hydra overrides...]
#     ARM:    rwkv | rwkv_jit | fla-share | fla-separate | fla-native | fla-share-by_name | head
#             (fla-share-by_name: FLA from shared weights with the published optimizer groups whatever the recipe,
#              the confound arm; head: upstream RWKV-LM HEAD through impl=rwkv_lm, its checkout at $HEAD_CHECKOUT,
#              default .upstream/head/RWKV-v7/train_temp, kernel @rwkv3, JIT on)
#     RECIPE: fair (default: optimizer groups by parameter role, identical for every impl)
#             published (RWKV-LM's name rules on each impl's names: under FLA w0 loses its 2x lr and the
#                        LoRA matrices gain weight decay, as in the published comparison)
set -euo pipefail
cd "$(dirname "$0")/.."
ARM=${1:?usage: $0 ARM [fair|published] [overrides...]}
RECIPE=${2:-fair}
shift $(( $# >= 2 ? 2 : 1 ))

case "$ARM" in
  rwkv)         IMPL=rwkv;     INIT=shared ;;
  rwkv_jit)     IMPL=rwkv_jit; INIT=shared ;;
  fla-share)    IMPL=fla;      INIT=shared ;;
  fla-separate) IMPL=fla;      INIT=seed_separate ;;
  fla-native)   IMPL=fla;      INIT=native ;;
  fla-share-by_name) IMPL=fla;  INIT=shared ;;
  head)         IMPL=rwkv_lm;  INIT=shared ;;
  *) echo "error: unknown arm '$ARM' (rwkv, rwkv_jit, fla-share, fla-separate, fla-native, fla-share-by_name, head)" >&2
     exit 2 ;;
esac
IMPL_ARGS=()
if [ "$IMPL" = rwkv_lm ]; then
  IMPL_ARGS=("impl.path=${HEAD_CHECKOUT:-.upstream/head/RWKV-v7/train_temp}" "impl.kernel=@rwkv3" "impl.jit=true"
             "impl.label=${HEAD_LABEL:-head-524481d}")
fi
case "$RECIPE" in
  fair)      GROUPING=by_role ;;
  published) GROUPING=by_name ;;
  *) echo "error: unknown recipe '$RECIPE' (fair, published)" >&2; exit 2 ;;
esac
[ "$ARM" = fla-share-by_name ] && GROUPING=by_name

exec python -m harness.run \
  impl=$IMPL "${IMPL_ARGS[@]}" init=$INIT model=L12-D768 data=${DATA:-minipile} \
  experiment=${EXPERIMENT:-published-study-$RECIPE} seed=${SEED:-0} \
  bsz=48 trainer=gpu trainer.devices=1 trainer.num_nodes=1 trainer.strategy=deepspeed_stage_2 \
  trainer.precision=bf16-mixed trainer.grad_cp=true trainer.max_steps=2000 \
  optim.grouping=$GROUPING optim.lr_init=6e-4 optim.lr_final=6e-5 optim.warmup_steps=10 \
  optim.exit_tokens=1498226207 optim.weight_decay=0.001 optim.eps=1e-18 "optim.betas=[0.9,0.99]" \
  optim.grad_clip=1.0 "$@"
