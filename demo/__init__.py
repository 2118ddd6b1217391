"""medfm.demo: the embedded end-to-end demo (``medfm demo``) and the demo data.

It drives the other parts (shards -> pretrain under ``medfm launch`` -> evals -> release into the zoo) and is the one
place that generates demo data from the real files shipped inside packages: the demo corpus (``corpus.py``) and the
small MNI152 tasks the eval tests use (``mni_tasks.py``), both cut from one reading of the template (``mni.py``).
Dependencies point one way: demo -> {launch, pretrain, evals, shards, model_zoo}; only ``medfm.launch.cli``
(the ``demo`` verb, through ``medfm.demo.cli``) and tests import it.

Modules: ``cli`` (the verb), ``stages`` (the five stages, ``run_demo``), ``recipes`` (the pretrain config read from
``configs/pretrain/demo.yaml`` and the eval suite the demo writes), ``verdict`` (pretrained vs random init),
``report`` (REPORT.md and its plot), ``corpus`` (``build_demo_corpus``), ``tasks`` (the corpus's labelled tasks),
``sources`` (real / ECG / EHR source files), ``brain_patches`` (the mri2d / mri3d families), ``mni`` and
``mni_tasks``.
"""
