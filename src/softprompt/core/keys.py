"""Names of the metrics and config keys that training logs and that reports and dashboards read.

One place, so that renaming a key cannot silently break the report or the W&B dashboard.
"""

# metrics.json / W&B summary
EVAL_PERPLEXITY = "eval/perplexity"
EVAL_BASE_PERPLEXITY = "eval/base_perplexity"
EVAL_LOSS = "eval/loss"
EVAL_BASE_LOSS = "eval/base_loss"
EVAL_TOKENS = "eval/tokens"
EVAL_PPL_RATIO = "eval/perplexity_ratio"  # tuned / base: < 1 means the prompt helped
TRAIN_LOSS = "train/loss"
TRAIN_EPOCHS = "train/epochs"
TRAIN_STEPS = "train/steps"
TRAIN_RUNTIME_S = "train/runtime_s"
TRAIN_TOKENS_PER_SECOND = "train/tokens_per_second"  # real (non-pad, non-virtual) tokens
TRAIN_TIME_TO_FIRST_STEP_S = "train/time_to_first_step_s"  # from the run's start (run() entry)
TRAIN_TIME_TO_FIRST_STEP_PROCESS_S = "train/time_to_first_step_process_s"  # from the process start (imports too)
TRAIN_TRAINABLE_PARAMS = "train/trainable_params"
TRAIN_TOTAL_PARAMS = "train/total_params"
TRAIN_TOKENS_SEEN = "train/tokens_seen"  # real (non-pad, non-virtual) tokens trained on
TRAIN_FLOPS = "train/flops"  # training FLOPs: softprompt.models.flops (4N per real token for prompt tuning)
TRAIN_PRECISION = "train/precision"
TRAIN_ATTENTION = "train/attention"  # the training step's attention: model, eager, math_backward
TRAIN_COMPILE_S = "train/compile_s"  # training.torch_compile: compiling the decoder (one warm-up forward/backward)
TRAIN_RESUMED_FROM_STEP = "train/resumed_from_step"  # 0 unless training.resume continued a checkpoint
PEFT_NUM_VIRTUAL_TOKENS = "peft/num_virtual_tokens"
EVAL_RUNTIME_S = "eval/runtime_s"  # evaluation time this run spent (base + tuned)
EVAL_BASE_RUNTIME_S = "eval/base_runtime_s"  # base evaluation time this run spent (~0 on a cache hit)
EVAL_BASE_COMPUTE_S = "eval/base_compute_s"  # what the base evaluation cost when it was computed
EVAL_TUNED_RUNTIME_S = "eval/tuned_runtime_s"
EVAL_BASE_CACHED = "eval/base_cached"  # 1: the base evaluation came from the on-disk cache
# where a plain run's wall time went (softprompt.train.run): consecutive phases from the run's start
# (run() entry) to metrics.json, so they add up to time/total_s; the pack engine does not write them
TIME_STARTUP_S = "time/startup_s"  # checks, data, model load, W&B init, PEFT wrap
TIME_BASE_EVAL_S = "time/base_eval_s"  # the base model's evaluation (~0 on a cache hit)
TIME_TRAIN_S = "time/train_s"  # the training loop with its set-up, per-epoch evaluations and checkpoints
TIME_TUNED_EVAL_S = "time/tuned_eval_s"  # the tuned model's evaluation and the comparison metrics
TIME_SAVE_S = "time/save_s"  # adapter, generations, history, prompt tokens, W&B tables and artifact
TIME_TOTAL_S = "time/total_s"  # run() entry to metrics.json (not the imports before, nor W&B's finish after)
TIME_PHASES = (TIME_STARTUP_S, TIME_BASE_EVAL_S, TIME_TRAIN_S, TIME_TUNED_EVAL_S, TIME_SAVE_S)
# perplexity on the first eval.train_perplexity_rows rows of the training split
TRAIN_PERPLEXITY = "train/perplexity"
TRAIN_BASE_PERPLEXITY = "train/base_perplexity"
TRAIN_PERPLEXITY_TOKENS = "train/perplexity_tokens"
# generation metrics on the held-out examples (softprompt.evaluation.gen_metrics): gen/{base,tuned}_{metric}
GEN_EXAMPLES = "gen/examples"
GEN_METRICS = ("rougeL", "distinct2", "repetition", "length_words")


def gen_key(model: str, metric: str) -> str:
    """e.g. gen_key("tuned", "rougeL") -> "gen/tuned_rougeL"."""
    return f"gen/{model}_{metric}"


# history (W&B curves); the x-axis of per-epoch curves is "epoch"
EPOCH = "epoch"
TRAIN_LEARNING_RATE = "train/learning_rate"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_STEP = "train/global_step"

# memory: the process's peaks when the job's outputs are written (a pack's jobs share one process)
MEMORY_PEAK_RSS_BYTES = "memory/peak_rss_bytes"  # resident set (the CPU's memory)
MEMORY_CUDA_PEAK_ALLOCATED_BYTES = "memory/cuda_peak_allocated_bytes"  # on a CUDA device only

# W&B tables
GENERATIONS_TABLE = "eval/generations"

# config keys the sweeps vary
CFG_NUM_VIRTUAL_TOKENS = "peft.num_virtual_tokens"
CFG_EPOCHS = "training.epochs"
CFG_LEARNING_RATE = "training.learning_rate"
CFG_INIT = "peft.init"
CFG_PEFT_METHOD = "peft.method"

REQUIRED_METRICS = (
    EVAL_PERPLEXITY,
    EVAL_BASE_PERPLEXITY,
    EVAL_LOSS,
    TRAIN_LOSS,
    TRAIN_EPOCHS,
    TRAIN_RUNTIME_S,
    TRAIN_TOKENS_PER_SECOND,
    TRAIN_TRAINABLE_PARAMS,
    PEFT_NUM_VIRTUAL_TOKENS,
)

# packed sweeps (softprompt.train.pack): in metrics.json of a job trained in a pack
PACK_JOBS = "pack/jobs"  # jobs trained together in its process
PACK_FORWARD = "pack/forward"  # concat or turns: how the pack's rows went through the base model
PACK_TRUNK_STEPS = "pack/trunk_steps"  # optimizer steps it shared with a job of another length
# a job that W&B stopped (the web UI's stop button, a sweep controller's early termination): the
# epochs it had trained when it was written as a result (metrics.json has it only then)
SWEEP_TERMINATED_AT_EPOCH = "sweep/terminated_at_epoch"
