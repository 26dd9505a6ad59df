// The recipe's price: alpaca_nb.costs.recipe_cost in the page. Python sent its terms (costs.RecipeTerms: one
// request's dollars per model, the FLOPs of one epoch, each GPU's peak and rent); this multiplies them.
const fixed = (value, digits) => value.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
const g3 = (value) => {  // Python's {:.3g}
  const [mantissa, exponent] = value.toExponential(2).split("e");
  return `${mantissa.replace(/\.?0+$/, "")}e${exponent[0]}${exponent.slice(1).padStart(2, "0")}`;
};

export function recipeCost(terms, s) {
  const requests = terms.n_instructions / (terms.tasks_per_completion * s.keep_rate);
  const batchUsd = terms.batch_request_usd[s.model];
  const perRequest = s.batch && batchUsd !== null ? batchUsd : terms.request_usd[s.model];
  const flops = terms.flops_per_epoch * s.epochs;
  const gpu = terms.gpus[s.gpu_name];
  const wallHours = flops / (s.n_gpus * gpu.peak_bf16_tflops * 1e12 * s.mfu) / 3600;
  const generationUsd = requests * perRequest, finetuneUsd = wallHours * s.n_gpus * gpu.usd_per_hour;
  return { requests, generationUsd, flops, wallHours, gpuHours: wallHours * s.n_gpus, finetuneUsd,
           totalUsd: generationUsd + finetuneUsd, batchPriced: s.batch && batchUsd !== null };
}

function control(settings, name, text, element, read) {
  const label = document.createElement("label");
  const caption = document.createElement("span"), shown = document.createElement("span");
  caption.textContent = text;
  const show = () => { shown.textContent = element.type === "range" ? element.value : ""; };
  element.addEventListener("input", () => { settings[name] = read(element); show(); });
  show();
  label.append(caption, element, shown);
  return label;
}

function range(value, min, max, step) {
  return Object.assign(document.createElement("input"), { type: "range", min, max, step, value });
}

function select(options, value) {
  const element = document.createElement("select");
  for (const option of options) element.add(new Option(option, option, false, option === value));
  return element;
}

function render({ model, el }) {
  const terms = model.get("terms"), settings = { ...model.get("settings") };
  const output = Object.assign(document.createElement("div"), { className: "alpaca-nb-output" });
  const checkbox = Object.assign(document.createElement("input"), { type: "checkbox", checked: settings.batch });
  const controls = [
    control(settings, "keep_rate", "keep rate", range(settings.keep_rate, 0.05, 1, 0.05), (e) => Number(e.value)),
    control(settings, "model", "teacher prices", select(Object.keys(terms.request_usd), settings.model), (e) => e.value),
    control(settings, "batch", "batch API discount", checkbox, (e) => e.checked),
    control(settings, "gpu_name", "GPU", select(Object.keys(terms.gpus), settings.gpu_name), (e) => e.value),
    control(settings, "n_gpus", "GPUs", range(settings.n_gpus, 1, 16, 1), (e) => Number(e.value)),
    control(settings, "mfu", "MFU", range(settings.mfu, 0.05, 1, 0.05), (e) => Number(e.value)),
    control(settings, "epochs", "epochs", range(settings.epochs, 1, 5, 1), (e) => Number(e.value)),
  ];

  function refresh() {
    const cost = recipeCost(terms, settings);
    const gpu = terms.gpus[settings.gpu_name];
    const batch = !settings.batch ? "" : cost.batchPriced ? " (batch API prices)"
      : ` (no batch API at ${settings.model}'s ${terms.prices_as_of[settings.model]} prices: full price)`;
    output.innerHTML = `<p>generation: <b>${fixed(cost.requests, 0)}</b> requests, <b>$${fixed(cost.generationUsd, 2)}</b>`
      + `${batch} at ${settings.model}'s ${terms.prices_as_of[settings.model]} prices<br>`
      + `fine-tuning: ${g3(cost.flops)} FLOPs, <b>${fixed(cost.wallHours, 2)} h</b> on ${settings.n_gpus}&times;${gpu.name} `
      + `(${fixed(cost.gpuHours, 1)} GPU-hours), <b>$${fixed(cost.finetuneUsd, 2)}</b><br>`
      + `whole recipe: <b>$${fixed(cost.totalUsd, 2)}</b></p>`;
    Object.assign(output.dataset, { requests: cost.requests, generationUsd: cost.generationUsd,
                                    wallHours: cost.wallHours, finetuneUsd: cost.finetuneUsd, totalUsd: cost.totalUsd });
    model.set("settings", { ...settings });
    try { model.save_changes(); } catch { /* the static page has no kernel to tell */ }
  }

  for (const label of controls) label.querySelector("input, select").addEventListener("input", refresh);
  const title = document.createElement("div");
  title.innerHTML = "<b>Price the recipe</b> (measured token counts, dated prices; the arithmetic runs in this page)";
  el.classList.add("alpaca-nb-static");
  el.append(title, ...controls, output);
  refresh();
}

export default { render };
