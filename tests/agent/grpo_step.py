"""One GRPO step of `hybrid-lm agent rl`'s trainer, in its own process (TRL's colocated engine
initialises torch.distributed for the process): `python grpo_step.py POLICY OUT RESULT.json`.

It records what test_rl.py checks: the rollout_func's output, the trainer's parameters against
the engine's after TRL's weight sync (bit for bit), and a fixed prompt's greedy action from the
engine before the step, after it, and from the trained model in transformers.
"""
import argparse
import json
import sys

import torch


def main(policy: str, out: str, result_path: str) -> None:
    from vllm import SamplingParams

    from hybrid_lm.agent import rl
    from hybrid_lm.agent.episodes import browsers

    parser = argparse.ArgumentParser()
    rl.add_arguments(parser)
    args = parser.parse_args(["--policy", policy, "--out", out, "--tasks", "click-test,click-button",
                              "--max-steps", "1", "--instances", "2", "--group-size", "2", "--pool", "4",
                              "--step-cap", "2", "--lr", "0.05"])
    with browsers(4, args.step_cap) as envs:
        # the entropy bonus moves the policy whatever the rewards of an untrained policy are
        trainer, rollout = rl.build_trainer(args, envs, entropy_coef=1.0)
        outputs = []

        def recording_rollout(prompts, trainer_):
            out_ = rollout(prompts, trainer_)
            outputs.append({"prompts": prompts, **out_})
            return out_

        trainer.rollout_func = recording_rollout
        llm = trainer.vllm_generation.llm
        tokenizer = rollout.tokenizer
        prompt = tokenizer.encode('task: Click on the "ok" button.\n[3] button "ok"\naction:', add_special_tokens=False)
        greedy = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[tokenizer.eos_token_id])

        def engine_action() -> list[int]:
            return list(llm.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)[0].outputs[0].token_ids)

        before = engine_action()
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        trainer.vllm_generation.sync_weights()  # what TRL does before the next rollout
        after = engine_action()

        model = trainer.model.eval()
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        engine = dict(llm.llm_engine.model_executor.driver_worker.model_runner.model.named_parameters())
        trained = dict(model.named_parameters())
        result = {
            "rollout": outputs,
            "changed": [n for n, p in trained.items() if not torch.equal(p, start[n])],
            "unequal": [n for n, p in trained.items() if n not in engine or engine[n].dtype != p.dtype
                        or not torch.equal(engine[n].detach().cpu(), p.detach())],
            "dtypes": sorted({str(p.dtype) for p in engine.values()}),
            "params": len(trained),
            "before": before, "after": after, "hf_after": hf[0, len(prompt):].tolist(),
            "log": trainer.state.log_history,
        }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
