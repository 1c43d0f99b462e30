# openmoe.c: CPU targets always; CUDA targets when nvcc is found (as llm.c does).
CC ?= gcc
CFLAGS ?= -O3 -march=native
# override: a CFLAGS given on the command line (make CFLAGS="-O3 -march=haswell")
# still gets OpenMP, FMA contraction, no errno from sqrtf (so that loops with it
# vectorise; the results are the same) and the warnings
override CFLAGS += -std=gnu11 -ffp-contract=fast -fno-math-errno -fopenmp -Wall -Wextra -Wno-unused-parameter -I.
LDLIBS = -lm
PYTHON ?= /usr/bin/python3

NVCC := $(shell which nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
HAVE_CUDA := $(and $(NVCC),$(wildcard openmoe.cu))
NVCC_FLAGS = -O3 -std=c++17 -arch=sm_90 -I. -Xcompiler -fopenmp -diag-suppress 177
NVCC_LDLIBS = -lcublas -lcublasLt -lm -lgomp

# data parallelism (README "Several GPUs"): make train MPI=1 builds ./train
# with mpicc, make train_gpu MPI=1 builds ./train_gpu with MPI's flags and
# NCCL from the CUDA toolkit; -B rebuilds a binary made without MPI=1
CUDA_HOME := $(patsubst %/bin/nvcc,%,$(NVCC))
MPI_CFLAGS = -DUSE_MPI
ifdef MPI
CC = mpicc
# override, as above: a plain += after an override is ignored
override CFLAGS += $(MPI_CFLAGS)
NVCC_FLAGS += $(MPI_CFLAGS) $(shell mpicc --showme:compile) -I$(CUDA_HOME)/include
NVCC_LDLIBS += $(shell mpicc --showme:link) -L$(CUDA_HOME)/lib64 -lnccl
ifdef GPU_BINARIES
ifeq ($(wildcard $(CUDA_HOME)/include/nccl.h),)
$(error MPI=1 for the GPU needs NCCL, but $(CUDA_HOME)/include/nccl.h is missing: install NCCL into the CUDA toolkit)
endif
endif
endif

CPU_TARGETS = train run test_cpu
GPU_TARGETS = train_gpu run_gpu test_gpu

.PHONY: all gpu test data bench analyze tiny experiments clean asan fuzz fuzz_harnesses mutate FORCE
all: $(CPU_TARGETS) $(if $(HAVE_CUDA),gpu)

# the CPU backend: openmoe.c, with its matrix products from gemm.c; make
# PLAIN=1 builds it with openmoe.c's plain loops instead (the same bits, slowly)
ifdef PLAIN
CPU_SRC = openmoe.c
override CFLAGS += -DPLAIN
else
CPU_SRC = openmoe.c gemm.c
endif
CPU_DEPS = $(CPU_SRC) openmoe.h gemm.h utils.h build/flags
# the compile line in build/flags: a change of PLAIN, CC or CFLAGS rebuilds the CPU programs
BUILD_FLAGS = $(CC) $(CFLAGS) $(CPU_SRC)
build/flags: FORCE
	@mkdir -p build
	@echo '$(BUILD_FLAGS)' | cmp -s - $@ || echo '$(BUILD_FLAGS)' > $@
train: train.c $(CPU_DEPS) tokenizer.h
	$(CC) $(CFLAGS) train.c $(CPU_SRC) -o $@ $(LDLIBS)
run: run.c $(CPU_DEPS) tokenizer.h
	$(CC) $(CFLAGS) run.c $(CPU_SRC) -o $@ $(LDLIBS)
test_cpu: test/test_model.c $(CPU_DEPS)
	$(CC) $(CFLAGS) test/test_model.c $(CPU_SRC) -o $@ $(LDLIBS)

# The CUDA backend links with the same programs: the .c files compile as C++
# under nvcc. "test_gpu" names both the binary and the GPU test run, so the
# binaries are built by a sub-make that sees only the file rules.
gpu:
	$(MAKE) GPU_BINARIES=1 $(GPU_TARGETS)
ifdef GPU_BINARIES
train_gpu: train.c openmoe.cu openmoe.h utils.h tokenizer.h
	$(NVCC) $(NVCC_FLAGS) -x cu train.c -x cu openmoe.cu -o $@ $(NVCC_LDLIBS)
run_gpu: run.c openmoe.cu openmoe.h utils.h tokenizer.h
	$(NVCC) $(NVCC_FLAGS) -x cu run.c -x cu openmoe.cu -o $@ $(NVCC_LDLIBS)
test_gpu: test/test_model.c openmoe.cu openmoe.h utils.h
	$(NVCC) $(NVCC_FLAGS) -x cu test/test_model.c -x cu openmoe.cu -o $@ $(NVCC_LDLIBS)
else
# GPU tests: PyTorch reference states through test_gpu, and GPU against CPU
.PHONY: test_gpu
test_gpu: $(CPU_TARGETS) gpu
	bash test/run_tests.sh gpu
endif

# every test: test/t_*.sh, counted by test/run_tests.sh into "N passed, M failed"
test: $(CPU_TARGETS)
	bash test/run_tests.sh

# ./train and ./run in both builds, whatever PLAIN says, for test/t_plain.sh and test/t_model_files.sh
build/plain/%: %.c openmoe.c openmoe.h gemm.h utils.h tokenizer.h
	@mkdir -p build/plain
	$(CC) $(filter-out -DPLAIN,$(CFLAGS)) -DPLAIN $*.c openmoe.c -o $@ $(LDLIBS)
build/fast/%: %.c openmoe.c gemm.c openmoe.h gemm.h utils.h tokenizer.h
	@mkdir -p build/fast
	$(CC) $(filter-out -DPLAIN,$(CFLAGS)) $*.c openmoe.c gemm.c -o $@ $(LDLIBS)

# ASan + UBSan builds for test/t_hardening.sh, beside the normal binaries
# -fexpensive-optimizations: at -O1 GCC would not fuse gemm's a*b+c, and
# decode (explicit fmaf) would then differ from the forward in the last bits
ASAN_FLAGS = -O1 -fexpensive-optimizations -g -march=native -fno-omit-frame-pointer -fsanitize=address,undefined \
             -fno-sanitize-recover=all
ASAN_TARGETS = build/asan/train build/asan/run build/asan/test_cpu
asan: $(ASAN_TARGETS)
build/asan/train: train.c $(CPU_DEPS) tokenizer.h
	@mkdir -p build/asan
	$(CC) $(ASAN_FLAGS) $(filter-out -O3 -march=native,$(CFLAGS)) train.c $(CPU_SRC) -o $@ $(LDLIBS)
build/asan/run: run.c $(CPU_DEPS) tokenizer.h
	@mkdir -p build/asan
	$(CC) $(ASAN_FLAGS) $(filter-out -O3 -march=native,$(CFLAGS)) run.c $(CPU_SRC) -o $@ $(LDLIBS)
build/asan/test_cpu: test/test_model.c $(CPU_DEPS)
	@mkdir -p build/asan
	$(CC) $(ASAN_FLAGS) $(filter-out -O3 -march=native,$(CFLAGS)) test/test_model.c $(CPU_SRC) -o $@ $(LDLIBS)

# the hardening test with N mutants per file reader (make test runs 200)
N ?= 2000
mutate: $(CPU_TARGETS)
	FUZZ_N=$(N) bash test/t_hardening.sh

# coverage-guided fuzzing: a libFuzzer harness per file reader
# (test/fuzz_targets.c), built with clang's ASan and UBSan into
# build/fuzz/fuzz_NAME; make fuzz runs each for FUZZ_SECONDS from seed corpora
# that test/t_fuzz.sh makes (make test: 3 s each). No OpenMP: one thread per
# input. Inputs that crash are kept under build/fuzz/.
FUZZ_SECONDS ?= 60
FUZZ_CC ?= clang
FUZZ_FLAGS = -O1 -g -march=native -std=gnu11 -ffp-contract=fast -fno-math-errno -fno-omit-frame-pointer \
             -fsanitize=address,undefined -fno-sanitize-recover=all -Wall -Wextra -Wno-unused-parameter \
             -Wno-unknown-pragmas -DFUZZING -I.
FUZZ_HARNESSES = model tokenizer text tokens checkpoint debug_state
fuzz: $(CPU_TARGETS)
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash test/t_fuzz.sh
fuzz_harnesses: $(addprefix build/fuzz/fuzz_,$(FUZZ_HARNESSES))
FUZZ_OBJS = build/fuzz/openmoe.o build/fuzz/gemm.o
build/fuzz/%.o: %.c openmoe.h gemm.h utils.h
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link -c $< -o $@
build/fuzz/fuzz_%: test/fuzz_targets.c $(FUZZ_OBJS) train.c test/test_model.c openmoe.h utils.h tokenizer.h
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer -DFUZZ_$* test/fuzz_targets.c $(FUZZ_OBJS) -o $@ -lm

data:
	bash dev/prepare_kjv.sh

# the README's main job on a fresh machine: install what is missing, build,
# make the KJV data, train tiny on the CPU, plot, sample, analyse routing
STEPS ?= 1000
tiny:
	bash dev/setup.sh
	$(MAKE) train run
	$(MAKE) data
	./train -c tiny -o out/tiny -n $(STEPS) -e 100 -v 100 -a 32
	$(PYTHON) dev/plot_loss.py out/tiny
	./run out/tiny/model_$$(printf %08d $(STEPS)).bin -i "And God said" -n 200
	$(MAKE) analyze RUN_DIR=out/tiny

# the MPI build of train.c that test/t_mpi.sh runs (mpicc from openmpi-bin)
build/train_mpi: train.c $(CPU_DEPS) tokenizer.h
	@mkdir -p build
	mpicc $(CFLAGS) $(MPI_CFLAGS) train.c $(CPU_SRC) -o $@ $(LDLIBS)
# the routing variants of SPEC §8 on tiny, one run each, then causal LM
# against UL2 (SPEC §10) on two long runs (dev/experiments.sh): 800 steps each
# unless STEPS=N is given, the long ones 5000 unless LONG_STEPS=N;
# out/experiments/summary.md
LONG_STEPS ?= 5000
experiments: train
	$(MAKE) data
	PYTHON=$(PYTHON) LONG_STEPS=$(LONG_STEPS) bash dev/experiments.sh \
		$(if $(filter command line environment,$(origin STEPS)),$(STEPS),800)

build/bench_cpu: dev/bench_cpu.c openmoe.c gemm.c openmoe.h gemm.h utils.h
	@mkdir -p build
	$(CC) $(filter-out -DPLAIN,$(CFLAGS)) dev/bench_cpu.c -o $@ $(LDLIBS)
bench: build/bench_cpu
	bash dev/bench.sh

RUN_DIR ?= out/tiny
analyze:
	$(PYTHON) dev/analyze_routing.py $(RUN_DIR)

clean:
	rm -f $(CPU_TARGETS) train_gpu run_gpu test_gpu
	rm -rf build
