"""alpaca_nb: Stanford Alpaca reproduced end to end, the logic behind the alpaca-nb book.

Layout (issue 33's design note). The modules form layers, and a module imports only from layers below its own, so
that no import circle exists (tests/test_layout.py walks every import, lazy ones included):

1. foundations: ``profiles`` (settings, the user cache), ``progress``, ``data`` (pinned assets, loaders), ``jsonl``,
   ``processes``, ``claims`` (the paper's figures), ``stats`` (win rates, intervals, tests, power, agreement);
2. tools: ``models``, ``llm`` (endpoints, the embedded server), ``rouge``, ``api_costs``, ``training_compute``,
   ``sft``, ``batching``, ``export``;
3. stages, one per chapter's stage: ``seeds`` (1), ``selfinstruct`` (2), ``costs`` (3), ``train`` (4),
   ``evaluate``/``judge``/``hallucination`` (5), ``safety``/``demo`` (6); a stage module knows nothing of the recipe
   that strings the stages together;
4. the recipe: ``reproduce`` (stages run, skipped, resumed; the report card) and ``chapter_runs`` (what the
   chapters run through it: chapter 2's generation, chapter 4's fine-tune, each needed by later chapters);
5. views and commands: ``widgets``, ``static_widgets``, ``demo_server``, ``lab``, ``book``, ``cli``.

Done: ``stats`` below evaluation, judging and hallucination; ``profiles`` below ``data``; the chapters' runs out of
``selfinstruct`` and ``train`` into ``chapter_runs``: no circle is left. Still to do: split the modules that hold
several jobs (``evaluate``, ``selfinstruct``, ``train``, ``reproduce``, ``data``, ``llm``) into files of one job each.
"""

__version__ = "0.2.0"
