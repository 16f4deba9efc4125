// The ranked table page: draws the rows, sorts by a clicked header, shows a row's token in its
// prompt on hover.
(function () {
  const data = PAGE_DATA;
  const table = document.getElementById("ranked");
  const context = document.getElementById("context");
  const widest = {};
  data.values.forEach((name) => {
    widest[name] = Math.max(0, ...data.rows.map((r) => Math.abs(r[name] || 0)));
  });

  function cell(row, name) {
    const td = document.createElement("td");
    const value = row[name];
    if (!data.values.includes(name)) {
      td.textContent = value === null ? "NULL" : (typeof value === "string" && value.trim() !== value ? JSON.stringify(value) : String(value));
      return td;
    }
    td.className = "value";
    if (value !== null && widest[name] > 0) {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = (100 * Math.abs(value) / widest[name]) + "%";
      bar.style.background = value < 0 ? "#d62728" : "#1f77b4";
      td.append(bar);
    }
    const number = document.createElement("span");
    number.className = "number";
    number.textContent = value === null ? "NULL" : Number(value).toPrecision(4);
    td.append(number);
    return td;
  }

  function inContext(row) {
    const tokens = data.prompts[String(row.prompt_id)];
    if (!tokens || row.position === null || row.position === undefined) return null;
    const marked = new Set([row.position, row.attended].filter((p) => p !== null && p !== undefined));
    const parts = tokens.map((token, i) => {
      const span = document.createElement(marked.has(i) ? "mark" : "span");
      span.textContent = token;
      return span;
    });
    return parts;
  }

  function body(rows) {
    const tbody = document.createElement("tbody");
    rows.forEach((row) => {
      const tr = document.createElement("tr");
      data.columns.forEach((name) => tr.append(cell(row, name)));
      tr.addEventListener("mousemove", (event) => {
        const parts = inContext(row);
        if (!parts) return;
        context.replaceChildren(...parts);
        context.style.left = (event.clientX + 14) + "px";
        context.style.top = (event.clientY + 14) + "px";
        context.style.display = "block";
      });
      tr.addEventListener("mouseleave", () => { context.style.display = "none"; });
      tbody.append(tr);
    });
    return tbody;
  }

  function sortBy(index, th) {
    const name = data.columns[index];
    const down = !th.classList.contains("sorted-down");
    table.querySelectorAll("th").forEach((h) => h.classList.remove("sorted-up", "sorted-down"));
    th.classList.add(down ? "sorted-down" : "sorted-up");
    const rows = data.rows.slice().sort((a, b) => {
      const x = a[name], y = b[name];
      if (x === y) return 0;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * (down ? -1 : 1);
    });
    table.replaceChild(body(rows), table.tBodies[0]);
  }

  const head = table.createTHead().insertRow();
  data.columns.forEach((name, i) => {
    const th = document.createElement("th");
    th.textContent = name;
    th.addEventListener("click", () => sortBy(i, th));
    head.append(th);
  });
  table.append(body(data.rows));
  document.body.dataset.ready = "yes";
})();
