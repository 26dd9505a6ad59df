"""alpaca_nb: Stanford Alpaca reproduced end to end, the logic behind the alpaca-nb book.

Layout (issue 33's design note). Each file has one job, which its name says; the files form layers, and a module
imports only from layers below its own, so no import circle exists (tests/test_layout.py walks every import, lazy
ones included, and keeps every file under about 450 lines). A name that moved to a file of its own is re-exported
where it was, so chapters and users keep importing from the stage they learn (``from alpaca_nb.evaluate import
win_rate``).

1. foundations: ``profiles`` (settings, the user cache), ``progress``, ``jsonl``, ``processes``, ``claims`` (the
   paper's figures), ``stats`` (win rates, intervals, tests, power, agreement), ``record_files`` (strict record
   reading), ``assets`` (the pinned upstream files), ``data`` (finding, verifying, downloading; typed loaders);
2. tools: ``models``, ``call_failures``, ``llama_server`` (the embedded server), ``llm`` (endpoints), ``rouge``,
   ``api_costs``, ``training_memory``, ``training_compute``, ``sft``, ``batching``, ``export``, ``plots``
   (every chart, fed the stages' results);
3. stages, by chapter: ``seeds`` (1); ``selfinstruct_prompts``, ``format_constraints``, ``generation_runs``,
   ``selfinstruct_inspection`` and ``selfinstruct`` (2: the loop); ``costs`` (3); ``train_config``,
   ``training_data``, ``train_callbacks`` and ``train`` (4: the run); ``alpaca_eval``, ``blind_votes``,
   ``stop_rates``, ``judge``, ``hallucination``, ``truthfulqa`` and ``evaluate`` (5: the stage); ``content_filter``,
   ``safety`` (the watermark) and ``demo`` (6). A stage module knows nothing of the recipe that strings the stages
   together;
4. the recipe: ``stage_folders`` (a stage folder's records), ``reproduce`` (stages run, skipped, resumed),
   ``report_card`` (built from the stages) and ``report_pages`` (rendered), ``chapter_runs`` (what the chapters run
   through the recipe: chapter 2's generation, chapter 4's fine-tune, each needed by later chapters);
5. views and commands: ``widgets``, ``static_widgets``, ``demo_server``, ``lab``, ``book``, ``cli``.
"""

__version__ = "0.2.0"
