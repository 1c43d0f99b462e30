# openmoe.c: CPU targets always; CUDA targets when nvcc is found (as llm.c does).
CC ?= gcc
CFLAGS ?= -O3 -march=native
CFLAGS += -std=gnu11 -fopenmp -Wall -Wextra -Wno-unused-parameter -I.
LDLIBS = -lm
PYTHON ?= /usr/bin/python3

NVCC := $(shell which nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
NVCC_FLAGS = -O3 -std=c++17 -arch=sm_90 -I. -Xcompiler -fopenmp -diag-suppress 177
NVCC_LDLIBS = -lcublas -lcublasLt -lm -lgomp

CPU_TARGETS = train run test_cpu
GPU_TARGETS = $(if $(NVCC),train_gpu run_gpu test_gpu)

.PHONY: all test test_gpu data bench analyze clean
all: $(CPU_TARGETS) $(GPU_TARGETS)

train: train.c openmoe.c openmoe.h tokenizer.h
	$(CC) $(CFLAGS) train.c openmoe.c -o $@ $(LDLIBS)
run: run.c openmoe.c openmoe.h tokenizer.h
	$(CC) $(CFLAGS) run.c openmoe.c -o $@ $(LDLIBS)
test_cpu: test/test_model.c openmoe.c openmoe.h
	$(CC) $(CFLAGS) test/test_model.c openmoe.c -o $@ $(LDLIBS)

# the CUDA backend links with the same programs: the .c files compile as C++ under nvcc
train_gpu: train.c openmoe.cu openmoe.h tokenizer.h
	$(NVCC) $(NVCC_FLAGS) -x cu train.c -x cu openmoe.cu -o $@ $(NVCC_LDLIBS)
run_gpu: run.c openmoe.cu openmoe.h tokenizer.h
	$(NVCC) $(NVCC_FLAGS) -x cu run.c -x cu openmoe.cu -o $@ $(NVCC_LDLIBS)
test_gpu: test/test_model.c openmoe.cu openmoe.h
	$(NVCC) $(NVCC_FLAGS) -x cu test/test_model.c -x cu openmoe.cu -o $@ $(NVCC_LDLIBS)

# every test: test/t_*.sh, counted by test/run_tests.sh into "N passed, M failed"
test: $(CPU_TARGETS)
	bash test/run_tests.sh

# GPU tests: PyTorch reference states through test_gpu, and GPU against CPU
test_gpu: $(CPU_TARGETS) $(GPU_TARGETS)
	bash test/run_tests.sh gpu

data:
	bash dev/prepare_kjv.sh

bench: $(CPU_TARGETS)
	bash dev/bench.sh

RUN_DIR ?= out/tiny
analyze:
	$(PYTHON) dev/analyze_routing.py $(RUN_DIR)

clean:
	rm -f $(CPU_TARGETS) train_gpu run_gpu test_gpu
	rm -rf build
