# Importing released OpenMoE checkpoints (dev/import_openmoe.py), proven on
# synthetic checkpoints in their layout (test/make_hf_checkpoint.py) against
# an independent port of ColossalAI's model (test/openmoe_hf.py): C logits at
# SPEC §7 tolerances (capacity colossalai, CF 2.0, the batch one group, with
# and without drops), ./run's greedy generation token for token, and every
# bad directory refused.
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
# prompt 0 is short; the long one is the first of prompts 1..3 whose forward in
# the oracle drops nothing (section 6): whether it drops depends on its ids,
# and they on the text the tokenizer learns from, which changes with the spec
prompts=("The model" "Mixture of experts in C" "Experts in C route every token" "A mixture of experts, written in C")
for i in 0 1 2 3; do
    ./run $I/st.bin -z $T.bin -i "${prompts[$i]}" -t 0 -n 0 --ids > $I/prompt$i.ids 2> /dev/null
done

# 3. the oracle, one torch start for everything: logits of two sequences of
#    16 for each checkpoint, greedy generations, and one with the RoPE
#    position of decoding before ColossalAI's fix
{
    for ck in st bin drop; do echo "$I/$ck.oracle.log logits $I/$ck $I/$ck.state -B 2 -T 16 --seed 7"; done
    for ck in st bin; do for i in 0 1 2 3; do
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
#    generate, token for token; the oracle's prompt forward must drop
#    nothing, since run routes each prompt token alone
declare -A long
for ck in st bin; do
    for i in 1 2 3; do grep -q "prefill: 0 " $I/$ck.gen$i.oracle && { long[$ck]=$i; break; }; done
    [ -n "${long[$ck]:-}" ] || fail "run greedy = oracle: no long prompt that the oracle prefills without drops ($ck)"
    for i in 0 ${long[$ck]:-}; do
        ./run $I/$ck.bin -z $T.bin -i "${prompts[$i]}" -t 0 -n 24 --ids > $I/run.ids 2> /dev/null
        if [ "$(cut -d' ' -f1 $I/run.ids)" = 0 ] && [ "$(head -1 $I/$ck.gen$i.oracle)" = "$(cat $I/run.ids)" ] &&
            grep -q "prefill: 0 " $I/$ck.gen$i.oracle; then
            pass "run greedy = oracle, token for token: $ck \"${prompts[$i]}\" ($(wc -w < $I/run.ids) ids from start id 0)"
        else
            fail "run greedy != oracle: $ck \"${prompts[$i]}\": run $(cat $I/run.ids) / oracle $(cat $I/$ck.gen$i.oracle)"
        fi
    done
done
# the oracle's cached decoding agrees with one forward over the whole
# sequence; with the query at position + 1 it does not
agrees() { grep -q "full forward agrees: \([0-9]*\)/\1$" "$1"; }
ls=${long[st]:-1} lb=${long[bin]:-1}
if agrees $I/st.gen0.oracle && agrees $I/st.gen$ls.oracle && agrees $I/bin.gen0.oracle && agrees $I/bin.gen$lb.oracle; then
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
    [ -e $I/bad_$kind.bin ] || [ -e $I/bad_$kind.bin.tmp ] && fail "import $kind left a file behind"
done <<'EOF'
missing-tensor st-sharded tensor model.layers.1.mlp.experts.wo is missing
unexpected-tensor st unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq
wrong-shape st-sharded tensor model.layers.1.mlp.experts.wi_up has shape \[8, 48, 39\], expected \[8, 48, 40\]
unknown-dtype st-sharded tensor model.norm.weight has dtype I32
topk-disagree st 'router_topk' = 2 and 'topk' = 1 disagree
kv-heads st 'num_key_value_heads' = 1
tied st 'tie_word_embeddings' = True
bad-eps st 'rms_norm_eps' = 1e-05
no-config st config.json: cannot read
index-missing-file st-sharded names shard model-00002-of-00002.safetensors, which is missing
no-weights st no model.safetensors
EOF
mk $I/bad_dtype_bin --format bin --dtype f32 --bad unknown-dtype
expect_error "import refuses: unknown dtype in a .bin" "model.norm.weight has dtype torch.int32" imp $I/bad_dtype_bin $I/x.bin
