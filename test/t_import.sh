# Importing released OpenMoE checkpoints (dev/import_openmoe.py), proven on
# synthetic checkpoints in their layout (test/make_hf_checkpoint.py) against
# an independent port of ColossalAI's model (test/openmoe_hf.py): C logits at
# SPEC §7 tolerances (capacity colossalai, CF 2.0, the batch one group, with
# and without drops), ./run's greedy generation token for token (its prompt
# one routing group, as ColossalAI's generate, also where that group drops),
# and every bad directory refused.
source test/lib.sh
I=$BUILD/import
rm -rf $I && mkdir -p $I
mk() { $PYTHON test/make_hf_checkpoint.py "$@" > /dev/null; }
imp() { $PYTHON dev/import_openmoe.py "$@"; }

# 1. three checkpoints: two bf16 safetensors shards with the base release's
#    config spelling; one fp32 pytorch_model.bin with the 8b spelling; and
#    one whose routing is skewed to expert 0, so that capacity drops
mk $I/st --format st-sharded --dtype bf16 --spelling base --seed 1
mk $I/bin --format bin --dtype f32 --spelling 8b --seed 2
mk $I/drop --format bin-sharded --dtype f16 --spelling base --seed 3 --skew 0.5
for ck in st bin drop; do
    expect_ok "import $ck" imp $I/$ck $I/$ck.bin
done

# 2. the tokenizer for ./run: 320 of the model's 384 ids, <pad> 0 and EOS 1
#    as umT5's; the prompts ./run makes from it (start id 0, then the text)
T=$I/tok
cat tokenizer.bin-spec > $T.txt
spm_train --input=$T.txt --model_prefix=$T --vocab_size=320 --model_type=unigram --pad_id=0 --eos_id=1 \
    --unk_id=2 --bos_id=-1 --character_coverage=0.995 --minloglevel=2 > $T.log 2>&1 || cat $T.log
cp $T.model $I/st/tokenizer.model
expect_ok "import --tokenizer (tokenizer.model of the directory)" imp $I/st $I/st.bin --tokenizer $T.bin
# prompt 0 is short, 1..4 longer: whether a prompt's forward drops tokens in
# the oracle (section 6) depends on its ids, and they on the text the
# tokenizer learns from, which changes with the spec
prompts=("The model" "Mixture of experts in C" "Experts in C route every token" "A mixture of experts, written in C"
    "A mixture of experts, written in C and run on a small machine")
for i in 0 1 2 3 4; do
    ./run $I/st.bin -z $T.bin -i "${prompts[$i]}" -t 0 -n 0 --ids > $I/prompt$i.ids 2> /dev/null
done

# 3. the oracle, one torch start for everything: logits of two sequences of
#    16 for each checkpoint, greedy generations, and one with the RoPE
#    position of decoding before ColossalAI's fix
{
    for ck in st bin drop; do echo "$I/$ck.oracle.log logits $I/$ck $I/$ck.state -B 2 -T 16 --seed 7"; done
    for ck in st bin drop; do for i in 0 1 2 3 4; do
        echo "$I/$ck.gen$i.oracle generate $I/$ck -p '$(cat $I/prompt$i.ids)' -n 24 --limit 320"
    done; done
    for i in 1 2 3; do
        echo "$I/st.gen$i.old generate $I/st -p '$(cat $I/prompt$i.ids)' -n 24 --limit 320 --old-rope"
    done
} > $I/oracle.commands
$PYTHON test/openmoe_hf.py batch < $I/oracle.commands || fail "test/openmoe_hf.py batch"

# 4. C logits against the oracle's at capacity colossalai, CF 2.0, the batch
#    one group; its lb and router z-loss, its dropped fraction, and a total
#    loss and gradients of exactly 0 (no targets, zero coefficients)
for ck in st bin drop; do
    expect_ok "C logits = ColossalAI port's: $ck ($(sed 's/.*dropped/dropped/' $I/$ck.oracle.log))" \
        ./test_cpu $I/$ck.bin $I/$ck.state
    grep -E "^ok +(logits|losses)" $BUILD/last.log | sed 's/^ok  */    /'
done
if grep -q "dropped 0.000000" $I/drop.oracle.log; then fail "the skewed checkpoint drops nothing"; fi
# the drop case tells the capacity rules apart: at t5x's capacity it fails
cp $I/drop.state $I/drop_t5x.state
printf '\0\0\0\0' | dd of=$I/drop_t5x.state bs=4 seek=10 conv=notrunc status=none
if ./test_cpu $I/drop.bin $I/drop_t5x.state > $I/drop_t5x.log 2>&1; then
    fail "the drop case passes at capacity t5x too"
else
    pass "the drop case fails at capacity t5x ($(grep -o 'dropped [0-9.]*' $I/drop_t5x.log | head -1))"
fi

# 5. expert tensors laid out wrongly but with the expected shapes must not
#    pass: transposed [E, 2F, D] data, and the SiLU on the wrong half
for bad in transposed gate-up-swapped; do
    mk $I/$bad --format st-sharded --dtype bf16 --seed 1 --bad $bad
    imp $I/$bad $I/$bad.bin > /dev/null 2>&1
    if ./test_cpu $I/$bad.bin $I/st.state > $I/$bad.log 2>&1; then
        fail "a checkpoint with $bad experts matched the oracle"
    elif grep -q "^FAILED logits" $I/$bad.log; then
        pass "a checkpoint with $bad experts is caught by the logits"
    else
        fail "a checkpoint with $bad experts failed for another reason: $(tail -2 $I/$bad.log)"
    fi
done

# 6. greedy generation with the KV cache: ./run against the oracle's
#    generate, token for token, for every prompt: run's prompt is one forward
#    pass routed as one group (capacity colossalai, CF 2.0), as the oracle's.
#    The skewed checkpoint drops in some prompts' forward: there routing each
#    prompt token alone (as decoding does, and as run did before its prefill,
#    --prompt-routing token) generates otherwise
drops=0 differs=0
for ck in st bin drop; do
    for i in 0 1 2 3 4; do
        ./run $I/$ck.bin -z $T.bin -i "${prompts[$i]}" -t 0 -n 24 --ids > $I/run.ids 2> /dev/null
        dropped=$(sed -n 's/^prefill: \([0-9]*\) .*/\1/p' $I/$ck.gen$i.oracle)
        if [ "$(cut -d' ' -f1 $I/run.ids)" = 0 ] && [ "$(head -1 $I/$ck.gen$i.oracle)" = "$(cat $I/run.ids)" ]; then
            pass "run greedy = oracle, token for token: $ck \"${prompts[$i]}\" ($(wc -w < $I/run.ids) ids from start id 0; the prompt's forward drops $dropped assignments)"
        else
            fail "run greedy != oracle: $ck \"${prompts[$i]}\": run $(cat $I/run.ids) / oracle $(cat $I/$ck.gen$i.oracle)"
        fi
        [ "${dropped:-0}" -gt 0 ] || continue
        drops=$((drops + 1))
        ./run $I/$ck.bin -z $T.bin -i "${prompts[$i]}" -t 0 -n 24 --ids --prompt-routing token > $I/run_token.ids 2> /dev/null
        cmp -s $I/run.ids $I/run_token.ids || differs=$((differs + 1))
        expect_ok "run --verify, the prompt one group that drops: $ck \"${prompts[$i]}\"" \
            ./run $I/$ck.bin -z $T.bin -i "${prompts[$i]}" -t 0 -n 24 --verify
    done
done
if [ $drops -gt 0 ] && [ $differs -gt 0 ]; then
    pass "$drops prompts drop in their forward; routed token by token, $differs of them generate otherwise than the oracle"
else
    fail "no prompt whose forward drops ($drops), or none where token-by-token routing differs ($differs)"
fi
# the oracle's cached decoding agrees with one forward over the whole
# sequence; with the query at position + 1 it does not
agrees() { grep -q "full forward agrees: \([0-9]*\)/\1$" "$1"; }
ls=1
for i in 1 2 3; do grep -q "prefill: 0 " $I/st.gen$i.oracle && { ls=$i; break; }; done
if agrees $I/st.gen0.oracle && agrees $I/st.gen$ls.oracle && agrees $I/bin.gen0.oracle; then
    pass "the oracle's generate = the argmax of its full forward at every position"
else
    fail "the oracle's generate disagrees with its full forward: $(grep -h agrees $I/*.oracle | tr '\n' ' ')"
fi
if [ "$(head -1 $I/st.gen$ls.old)" != "$(head -1 $I/st.gen$ls.oracle)" ] && ! agrees $I/st.gen$ls.old; then
    pass "decoding the query at position + 1 (before ColossalAI's fix) generates differently ($(grep -o '[0-9]*/[0-9]*' $I/st.gen$ls.old) agree)"
else
    fail "the RoPE position of decoding makes no difference"
fi

# 7. run's options for imported models, tokenizers of another size. A model
#    whose greedy output is a known chain of ids ends at EOS, and at the chat
#    model's EOS "▁</" "s" ">" when its tokenizer has those pieces
spm_train --input=$T.txt --model_prefix=$I/chat --vocab_size=320 --model_type=unigram --pad_id=0 --eos_id=1 \
    --unk_id=2 --bos_id=-1 --character_coverage=0.995 --user_defined_symbols="▁</" --minloglevel=2 > /dev/null 2>&1
$PYTHON dev/export_tokenizer.py $I/chat.model $I/chat_tok.bin > /dev/null
chat=$(echo "</s>" | ./run -z $I/chat_tok.bin --encode)  # "▁</" "s" ">"
mk $I/chain --format st --chain "10 $chat 20 1 30"
imp $I/chain $I/chain.bin > /dev/null 2>&1
expect_ok "generation stops at the chat EOS ▁</ s > ($chat)" \
    sh -c "[ \"\$(./run $I/chain.bin -z $I/chat_tok.bin -b 10 -t 0 -n 8 --ids 2>/dev/null)\" = '10 $chat' ]"
expect_ok "generation stops at EOS (the same ids, a tokenizer without ▁</)" \
    sh -c "[ \"\$(./run $I/chain.bin -z $T.bin -b 10 -t 0 -n 8 --ids 2>/dev/null)\" = '10 $chat 20 1' ]"
expect_ok "run --verify on an imported model" ./run $I/st.bin -z $T.bin -i "The model" -t 0 -n 16 --verify
expect_ok "run -b 5: another start id" sh -c "./run $I/st.bin -z $T.bin -b 5 -i 'The' -t 0 -n 1 --ids 2>/dev/null | grep -q '^5 '"
expect_error "run -b outside the vocabulary" "not an id" ./run $I/st.bin -z $T.bin -b 384 -n 1
spm_train --input=$T.txt --model_prefix=$I/big --vocab_size=400 --model_type=unigram --character_coverage=0.995 \
    --minloglevel=2 > /dev/null 2>&1
$PYTHON dev/export_tokenizer.py $I/big.model $I/big.bin > /dev/null
expect_error "run: a tokenizer larger than the model's vocabulary" "more than" ./run $I/st.bin -z $I/big.bin -n 1
cp $I/big.model $I/drop/tokenizer.model
expect_error "import --tokenizer: larger than V" "more than the model's vocabulary" imp $I/drop $I/x.bin --tokenizer $I/x_tok.bin
expect_error "import --tokenizer: none in the directory" "no tokenizer.model" imp $I/transposed $I/x.bin --tokenizer $I/x_tok.bin

# 8. every bad directory is refused with a message naming the key or file,
#    and leaves no output behind
while read -r kind fmt pattern; do
    mk $I/bad_$kind --format $fmt --dtype bf16 --seed 1 --bad $kind
    expect_error "import refuses: $kind" "$pattern" imp $I/bad_$kind $I/bad_$kind.bin
    if ls $I/bad_$kind.bin* > /dev/null 2>&1; then fail "import $kind left a file behind"; fi
done <<'EOF'
missing-tensor st-sharded tensor model.layers.1.mlp.experts.wo is missing
unexpected-tensor st unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq
wrong-shape st-sharded tensor model.layers.1.mlp.experts.wi_up has shape \[8, 48, 39\], expected \[8, 48, 40\]
unknown-dtype st-sharded tensor model.norm.weight has dtype I32
topk-disagree st 'router_topk' = 2 and 'topk' = 1 disagree
kv-heads st 'num_key_value_heads' = 1
tied st 'tie_word_embeddings' = True
bad-eps st 'rms_norm_eps' = 1e-05
no-config st config.json: cannot open (No such file or directory)
index-missing-file st-sharded names shard model-00002-of-00002.safetensors, which is missing
no-weights st no model.safetensors
EOF
mk $I/bad_dtype_bin --format bin --dtype f32 --bad unknown-dtype
expect_error "import refuses: unknown dtype in a .bin" "model.norm.weight has dtype torch.int32" imp $I/bad_dtype_bin $I/x.bin

# 9. what a malicious or broken download can hold (issue 27). Each refusal
#    must exit 1 with one "error: FILE: ..." line, the last of stderr, no
#    traceback, and leave neither x.bin nor a temporary file behind; a hang
#    is cut after 60 s (and fails)
imp_refuses() {  # NAME PATTERN HF_DIR [ARGS...]
    local name=$1 pattern=$2 dir=$3; shift 3
    rm -rf $I/out && mkdir $I/out
    timeout 60 $PYTHON dev/import_openmoe.py "$dir" $I/out/x.bin "$@" > /dev/null 2> $I/x.err
    local rc=$? last
    last=$(tail -1 $I/x.err)
    if [ $rc = 1 ] && [ "$(grep -c '^error: ' $I/x.err)" = 1 ] && [[ $last == "error: "* ]] &&
        ! grep -q Traceback $I/x.err && echo "$last" | grep -q -- "$pattern" && [ -z "$(ls -A $I/out)" ]; then
        pass "import refuses: $name"
    else
        fail "import refuses: $name (exit $rc, left [$(ls -A $I/out | tr '\n' ' ')], stderr: $(tail -3 $I/x.err | tr '\n' ' '))"
    fi
}

# finding 1: a .bin whose pickle calls os.system is refused without running
#    it (torch.load, even with weights_only=True on torch < 2.6, would), in
#    both of torch's formats; the oracle refuses it too
for fmt in bin bin-sharded; do
    mk $I/exec_$fmt --format $fmt --dtype f32 --bad pickle-exec
    imp_refuses "a pickle calling os.system ($fmt)" "pickle calls posix.system" $I/exec_$fmt
    mk $I/legacy_$fmt --format $fmt --dtype f32 --bad pickle-exec-legacy
    imp_refuses "a .bin in torch's legacy format ($fmt)" "legacy" $I/legacy_$fmt
done
$PYTHON test/openmoe_hf.py logits $I/exec_bin $I/x.state > $I/x.log 2>&1 && fail "the oracle loaded a pickle calling os.system"
if ls $I/exec_*/EXECUTED $I/legacy_*/EXECUTED > /dev/null 2>&1; then
    fail "a checkpoint's pickle ran its command: $(ls $I/*/EXECUTED | tr '\n' ' ')"
else
    pass "no checkpoint's pickle ran its command (importer and oracle)"
fi
# .bin shards read without torch give the model the safetensors give
mk $I/same_bin --format bin-sharded --dtype bf16 --seed 1
expect_ok "a .bin import = the safetensors import of the same weights" \
    sh -c "$PYTHON dev/import_openmoe.py $I/same_bin $I/same_bin.bin > /dev/null 2>&1 && cmp $I/same_bin.bin $I/st.bin"

# finding 6: config values checked against the model file's limits first
while read -r kv pattern; do
    mk $I/cfg --format st --dtype bf16 --set "$kv"
    imp_refuses "config $kv" "$pattern" $I/cfg
done <<'EOF2'
max_position_embeddings=4294967360 'max_position_embeddings' = 4294967360, needs a whole number in 1 .. 2147483647
max_position_embeddings=2147483648 'max_position_embeddings' = 2147483648, needs
max_position_embeddings=2097152 'max_position_embeddings' = 2097152 > 1048576
hidden_size=2147483648 'hidden_size' = 2147483648, needs
hidden_size=48.0 'hidden_size' = 48.0, needs a whole number
hidden_size="48" 'hidden_size' = '48', needs a whole number
hidden_size=true 'hidden_size' = True, needs a whole number
num_experts=-8 'num_experts' = -8, needs a whole number
num_attention_heads=134217728 num_attention_heads \* head_dim = 2147483648 does not fit an int32
intermediate_size=1073741824 2 \* intermediate_size = 2147483648 does not fit an int32
num_hidden_layers=1000000 model.layers.4.input_layernorm.weight is missing (config.json describes 11500003 tensors, the weight files hold 49)
EOF2
mk $I/cfg --format st --dtype bf16
sed -i 's/"hidden_size": 48,/"hidden_size": 48, "hidden_size": 96,/' $I/cfg/config.json
imp_refuses "config.json with a key twice" "config.json: key 'hidden_size' appears twice" $I/cfg
echo '[1, 2]' > $I/cfg/config.json
imp_refuses "config.json not an object" "config.json: holds a JSON array, not an object" $I/cfg

# finding 8: nothing outside the checkpoint directory is opened, and only
#    regular files are read
mkfifo $I/fifo
for fmt in st-sharded bin-sharded; do
    ext=$([ $fmt = st-sharded ] && echo safetensors || echo bin)
    prefix=$([ $fmt = st-sharded ] && echo model || echo pytorch_model)
    for name in ../../../../../../../etc/passwd /etc/passwd ../fifo; do
        rm -rf $I/paths && mk $I/paths --format $fmt --dtype f32
        sed -i "s|$prefix-00002-of-00002.$ext|$name|" $I/paths/$prefix.$ext.index.json
        imp_refuses "the index names $name ($fmt)" "'${name//./\\.}' is not a file name in the checkpoint directory" $I/paths
    done
done
rm -rf $I/paths && mk $I/paths --format st --dtype f32
rm $I/paths/model.safetensors && mkfifo $I/paths/model.safetensors
imp_refuses "model.safetensors a FIFO" "model.safetensors: not a regular file" $I/paths
rm -rf $I/paths $I/outside && mk $I/paths --format st-sharded --dtype f32 && mkdir $I/outside
mv $I/paths/model-00002-of-00002.safetensors $I/outside/ && ln -s ../outside/model-00002-of-00002.safetensors $I/paths/
imp_refuses "a shard linking out of the directory" "model-00002-of-00002.safetensors: links to .*/outside/model-00002-of-00002.safetensors, outside the checkpoint directory" $I/paths
# a Hugging Face cache snapshot, whose files link to ../../blobs, imports
C=$I/cache/models--OrionZheng--openmoe-micro
mkdir -p $C/blobs $C/snapshots/0123abc
for f in $I/st/*; do
    h=$(sha256sum < $f | cut -c1-64); cp $f $C/blobs/$h; ln -s ../../blobs/$h $C/snapshots/0123abc/$(basename $f)
done
expect_ok "a Hugging Face cache snapshot (files linking to ../../blobs) imports" \
    sh -c "$PYTHON dev/import_openmoe.py $C/snapshots/0123abc $I/cache.bin > /dev/null 2>&1 && cmp $I/cache.bin $I/st.bin"
rm -rf $I/paths && mk $I/paths --format st --dtype f32 && rm -f $I/paths/tokenizer.model && mkfifo $I/paths/tokenizer.model
imp_refuses "tokenizer.model a FIFO" "tokenizer.model: not a regular file" $I/paths --tokenizer $I/out/x_tok.bin

# finding 9: malformed, ambiguous or non-finite weights, and a failed write
mk $I/w_base --format st --dtype bf16
st_edit() {  # DIR PYTHON: runs PYTHON on h, the header of DIR/model.safetensors (t: a tensor's name), and rewrites it
    $PYTHON - "$1/model.safetensors" "$2" <<'PY'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    data = f.read()
n = struct.unpack_from("<Q", data)[0]
h, t = json.loads(data[8:8 + n]), "model.norm.weight"
exec(sys.argv[2])
raw = json.dumps(h).encode()
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
PY
}
while IFS='|' read -r name edit pattern; do
    rm -rf $I/hdr && cp -r $I/w_base $I/hdr && st_edit $I/hdr "$edit"
    imp_refuses "$name" "$pattern" $I/hdr
done <<'EOF2'
a header that is a list|h = [h]|model.safetensors: the header is a JSON array, not an object
a nested header|h = {"tensors": {k: v for k, v in h.items() if k != "__metadata__"}}|tensor tensors: its entry holds .*, not dtype, shape and data_offsets
offsets that are not integers|h[t]["data_offsets"] = [h[t]["data_offsets"][0] + 0.0, h[t]["data_offsets"][1]]|tensor model.norm.weight: data_offsets \[.*\], needs two whole numbers
a dtype that is a list|h[t]["dtype"] = ["BF16"]|tensor model.norm.weight has dtype \['BF16'\]
EOF2
mk $I/wm --format st-sharded --dtype bf16
sed -i 's/"weight_map": {/"weight_map": [{/; $ s/}$/]}/' $I/wm/model.safetensors.index.json
imp_refuses "a weight_map that is a list" "model.safetensors.index.json: 'weight_map' is a JSON array, not an object" $I/wm
for bad in overlap duplicate-key nan inf lfs-pointer; do
    mk $I/w_$bad --format st --dtype bf16 --bad $bad
done
mk $I/w_nan_bin --format bin --dtype f32 --bad nan
mk $I/w_shared --format bin --dtype f32 --bad shared-storage
imp_refuses ".bin tensors sharing elements" "its tensors have 240912 elements, more than the 240864 of its storages" $I/w_shared
imp_refuses "safetensors tensors on the same bytes" "tensors model.layers.0.input_layernorm.weight and model.layers.0.post_attention_layernorm.weight overlap" $I/w_overlap
imp_refuses "a tensor twice in a safetensors header" "key 'lm_head.weight' appears twice" $I/w_duplicate-key
imp_refuses "a NaN weight (safetensors)" "tensor model.norm.weight has 1 values that are not finite" $I/w_nan
imp_refuses "an inf weight (safetensors)" "tensor model.norm.weight has 1 values that are not finite" $I/w_inf
imp_refuses "a NaN weight (.bin)" "tensor model.norm.weight has 1 values that are not finite" $I/w_nan_bin
imp_refuses "a Git LFS pointer for the weights" "model.safetensors: is a Git LFS pointer, not the file: fetch it with git lfs pull" $I/w_lfs-pointer
expect_error "import into a directory that does not exist" "^error: $I/none/x.bin: cannot write (No such file or directory)$" \
    imp $I/st $I/none/x.bin
# a full disk: a 256 KiB tmpfs for the 964 KiB output where this may mount
# one (root), and always a file size limit (ulimit -f: writes fail with
# EFBIG, which Python receives as an OSError, not as SIGXFSZ)
mkdir -p $I/full
if [ "$(id -u)" = 0 ] && mount -t tmpfs -o size=256k tmpfs $I/full 2> /dev/null; then
    $PYTHON dev/import_openmoe.py $I/st $I/full/x.bin > /dev/null 2> $I/x.err
    rc=$?
    if [ $rc = 1 ] && [ "$(tail -1 $I/x.err)" = "error: $I/full/x.bin: cannot write (No space left on device)" ] &&
        [ -z "$(ls -A $I/full)" ]; then
        pass "import on a full disk: one error line, nothing left"
    else
        fail "import on a full disk: exit $rc, left [$(ls -A $I/full | tr '\n' ' ')], $(tail -2 $I/x.err | tr '\n' ' ')"
    fi
    umount $I/full
else
    echo "SKIP import on a full disk (a tmpfs needs root)"
fi
(ulimit -f 256; imp_refuses "a write past the file size limit (ulimit -f)" "x.bin: cannot write (File too large)" $I/st)
# finding 7: a planted OUT.tmp link is neither followed nor renamed; the
#    importer's and the exporter's outputs are new regular files
echo "keep" > $I/victim
ln -sf victim $I/planted.bin.tmp
ln -sf victim $I/planted_tok.bin.tmp
$PYTHON dev/import_openmoe.py $I/st $I/planted.bin > /dev/null 2>&1
$PYTHON dev/export_tokenizer.py $T.model $I/planted_tok.bin > /dev/null 2>&1
if [ "$(cat $I/victim)" = keep ] && [ -f $I/planted.bin ] && [ ! -L $I/planted.bin ] && cmp -s $I/planted.bin $I/st.bin &&
    [ -f $I/planted_tok.bin ] && [ ! -L $I/planted_tok.bin ] && cmp -s $I/planted_tok.bin $T.bin; then
    pass "a planted OUT.tmp link is not followed (importer, exporter)"
else
    fail "a planted OUT.tmp link was followed: victim '$(head -c 20 $I/victim | tr -c '[:print:]' .)', $(ls -l $I/planted.bin $I/planted_tok.bin 2>&1 | tr '\n' ' ')"
fi

# the structured mutation test: JSON structure, offsets, dtypes, shapes,
# paths, config values, non-finite weights, .bin pickles (IMPORT_MUTANTS
# mutants, 300 by default)
$PYTHON test/mutate_import.py $I/mutants $T.bin ${IMPORT_MUTANTS:-300} 27
