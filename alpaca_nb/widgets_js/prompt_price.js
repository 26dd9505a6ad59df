// The generation prompt's price: alpaca_nb.selfinstruct.assemble_prompt in the page. Python sent the prompt's
// parts with their token counts (PromptParts); any choice of seeds is their sum, so the price follows the
// picker without a kernel. An edited prompt needs the tokenizer: the kernel counts it where there is one.
const MARK = "\u0000";

function assemble(parts, chosen) {
  const numbered = (text, number) => text.split(MARK).join(String(number));
  const renumbered = (tokens, marks, number) => tokens + marks * (parts.number_tokens[number] - parts.number_tokens[1]);
  let prompt = parts.head, tokens = parts.head_tokens;
  chosen.forEach((index, position) => {
    prompt += numbered(parts.blocks[index], position + 1);
    tokens += renumbered(parts.block_tokens[index], parts.marks[index], position + 1);
  });
  const next = chosen.length + 1;
  return [prompt + numbered(parts.tail, next), tokens + renumbered(parts.tail_tokens, 1, next)];
}

function usd(rates, promptTokens, completionTokens) {  // alpaca_nb.api_costs.Price.cost
  return (promptTokens * rates.input_per_1m + completionTokens * rates.output_per_1m) / 1e6;
}

function render({ model, el }) {
  const parts = model.get("parts"), rates = model.get("rates");
  const picker = Object.assign(document.createElement("select"), { multiple: true, size: 8 });
  const chosen = new Set(model.get("chosen"));
  model.get("labels").forEach((label, index) => picker.add(new Option(label, index, false, chosen.has(index))));
  const output = Object.assign(document.createElement("div"), { className: "alpaca-nb-output" });
  const editing = Object.assign(document.createElement("div"), { className: "alpaca-nb-needs-kernel" });
  const editor = Object.assign(document.createElement("textarea"), { readOnly: true, spellcheck: false });
  const edited = Object.assign(document.createElement("p"), { className: "alpaca-nb-edited" });
  editing.append(editor, edited);
  const title = document.createElement("div");
  title.innerHTML = "<b>Build a generation prompt</b> (pick seeds with Ctrl/Cmd-click; with a kernel, edit the prompt)";

  function refresh() {
    const indices = [...picker.selectedOptions].map((option) => Number(option.value));
    const [prompt, tokens] = assemble(parts, indices);
    output.innerHTML = `<p><b>${indices.length}</b> seeds &rarr; <b>${tokens}</b> prompt tokens (${rates.model} tokenizer); `
      + `prompt $${usd(rates, tokens, 0).toFixed(4)}, worst case with a ${rates.max_tokens}-token completion `
      + `$${usd(rates, tokens, rates.max_tokens).toFixed(4)} at ${rates.model} prices.</p>`;
    output.dataset.tokens = tokens;
    editor.value = prompt;
    edited.textContent = "";
    model.set("chosen", indices);
    try { model.save_changes(); } catch { /* the static page has no kernel to tell */ }
  }

  let pending = null;
  editor.addEventListener("input", () => {
    clearTimeout(pending);
    pending = setTimeout(() => { model.set("edited_prompt", editor.value); model.save_changes(); }, 300);
  });
  model.on("change:edited_tokens", () => {
    const tokens = model.get("edited_tokens");
    edited.innerHTML = tokens === null ? "" : `your edited prompt: <b>${tokens}</b> prompt tokens, `
      + `prompt $${usd(rates, tokens, 0).toFixed(4)}, worst case $${usd(rates, tokens, rates.max_tokens).toFixed(4)}`;
  });
  model.on("msg:custom", (message) => {  // a kernel answered: the prompt may be edited and priced
    if (message.type !== "kernel") return;
    editor.readOnly = false;
    editing.classList.remove("alpaca-nb-needs-kernel");
  });
  try { model.send({ type: "ping" }); } catch { /* no kernel: the editor stays read-only and says so */ }

  picker.addEventListener("change", refresh);
  el.classList.add("alpaca-nb-static");
  el.append(title, picker, output, editing);
  refresh();
}

export default { render };
