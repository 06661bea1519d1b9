"""Would picking the final plan by the val loss help? The default search's trials as they are (read from a
`benchmarks/peers.py --methods autoprune` run's studies), each completed plan re-scored for its val loss after the
same preparation; the plan with the highest val accuracy (the first of ties) and the one with the lowest val loss,
each recovered with peers.py's common recovery (300 Adam steps, lr 1e-3) and tested.

    python benchmarks/peers.py --budgets 0.5,0.3,0.15 --seeds 0,1,2 --methods autoprune --out OUT
    python benchmarks/final_pick.py search_spaces/digits-resnet20-macs50.yaml OUT 0.5,0.3,0.15

Writes OUT-lossfinal.csv; an experiment, not a test. Results: benchmarks/results/final-pick-2026-11-26.md."""
import os, sys, json, copy, glob
os.environ["AUTOPRUNE_PROGRESS"]="0"
sys.path.insert(0, os.getcwd())
import torch, optuna, pandas as pd
optuna.logging.set_verbosity(optuna.logging.ERROR)
from benchmarks import peers
import autoprune
from autoprune.searching.objective import trial_attrs
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
torch.set_num_threads(1)
spec, out, budgets = sys.argv[1], sys.argv[2], sys.argv[3]
args = peers.parse(["--spec", spec, "--budgets", budgets, "--seeds", "0,1,2", "--out", out])
rows=[]
for b in budgets.split(","):
    budget=peers.parse_budget(b)
    for seed in (0,1,2):
        s=peers.session_for(args, budget, seed, "autoprune")
        j=f"{out}/runs-{peers.setting_of(budget)}/peers-{peers.setting_of(budget)}-s{seed}-autoprune/study.journal"
        st=JournalStorage(JournalFileBackend(j)); study=optuna.load_study(study_name=None, storage=st)
        cand=[]
        for t in study.trials:
            a=trial_attrs(t)
            if t.state.name!="COMPLETE" or not a.get("feasible", True) or "plan" not in a: continue
            plan=autoprune.PruningPlan.from_dict(a["plan"])
            acc, loss = s.evaluator.with_loss(s.pruner.apply(plan, check=False), plan=plan, pruner=s.pruner)
            cand.append((t.number, t.values[0], acc, loss, plan))
        by_acc=max(cand, key=lambda c: c[1])  # first max, as the study's best
        by_loss=min(cand, key=lambda c: c[3])
        res={}
        for name,c in (("acc",by_acc),("loss",by_loss)):
            if name=="loss" and c[0]==by_acc[0]:
                res["loss"]=res["acc"]; continue
            m=peers.recover(s.pruner.apply(c[4]), s.target.datasets["train"], steps=300, lr=1e-3,
                            batch_size=s.spec.data.batch_size, seed=seed, task=s.evaluator.task, teacher=s.target.model)
            res[name]=(c[0], round(c[2],4), round(c[3],4), float(s.evaluator.score(m,"test")))
        print(b, seed, "acc-pick", res["acc"], "loss-pick", res["loss"], flush=True)
        rows.append(dict(budget=b, seed=seed, acc_trial=res["acc"][0], acc_test=res["acc"][3], loss_trial=res["loss"][0],
                         loss_val_acc=res["loss"][1], loss_test=res["loss"][3]))
d=pd.DataFrame(rows); print(d.groupby("budget")[["acc_test","loss_test"]].agg(["mean","std"]).round(4))
d.to_csv(f"{out}-lossfinal.csv", index=False)
