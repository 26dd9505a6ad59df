// The seed browser: alpaca_nb.seeds.filter_tasks in the page. Python sent each task's shown cells, its fields
// lower-cased for the search, and its two flags (static_widgets.SeedBrowserWidget); this filters and draws.
const CHOICES = { any: null, yes: true, no: false };

function labelled(text, control) {
  const label = document.createElement("label");
  const name = document.createElement("span");
  name.textContent = text;
  label.append(name, control);
  return label;
}

function choice(value) {
  const select = document.createElement("select");
  for (const option of Object.keys(CHOICES)) select.add(new Option(option, option, false, option === value));
  return select;
}

function matching(tasks, classification, hasInput, text) {
  const needle = text.trim().toLowerCase();
  return tasks.filter((task) => (classification === null || task.classification === classification)
    && (hasInput === null || task.has_input === hasInput)
    && (!needle || task.fields.some((field) => field.includes(needle))));
}

function table(columns, tasks) {
  const element = document.createElement("table");
  const head = element.createTHead().insertRow();
  for (const column of columns) head.appendChild(document.createElement("th")).textContent = column;
  const body = element.createTBody();
  for (const task of tasks) {
    const row = body.insertRow();
    for (const cell of task.cells) row.insertCell().textContent = cell;
  }
  return element;
}

function render({ model, el }) {
  const tasks = model.get("tasks"), rows = model.get("rows");
  const classification = choice(model.get("classification")), hasInput = choice(model.get("has_input"));
  const search = Object.assign(document.createElement("input"), {
    type: "search", value: model.get("search"), placeholder: "search instruction, input, output" });
  search.dataset.probe = "email";  // what the book check types to see the search act
  const output = Object.assign(document.createElement("div"), { className: "alpaca-nb-output" });
  const title = document.createElement("div");
  title.innerHTML = `<b>Seed task browser</b> (${tasks.length} tasks)`;

  function refresh() {
    const matches = matching(tasks, CHOICES[classification.value], CHOICES[hasInput.value], search.value);
    const shown = Math.min(rows, matches.length);
    const header = document.createElement("p");
    header.innerHTML = `<b>${matches.length}</b> of ${tasks.length} tasks match; showing ${shown}.`;
    output.replaceChildren(header, ...(matches.length ? [table(model.get("columns"), matches.slice(0, rows))] : []));
    output.dataset.matches = matches.length;
    model.set({ classification: classification.value, has_input: hasInput.value, search: search.value });
    try { model.save_changes(); } catch { /* the static page has no kernel to tell */ }
  }

  for (const control of [classification, hasInput]) control.addEventListener("change", refresh);
  search.addEventListener("input", refresh);
  const controls = Object.assign(document.createElement("div"), { className: "alpaca-nb-row" });
  controls.append(labelled("classification", classification), labelled("has input", hasInput), labelled("search", search));
  el.classList.add("alpaca-nb-static");
  el.append(title, controls, output);
  refresh();
}

export default { render };
