// Z-Image playground. Plain JS, no build step.
//
// Every request goes to this page's own server through relative URLs ("info",
// "v1/z-image-turbo", so a reverse proxy may serve the page under a path prefix); the page's
// Content-Security-Policy (connect-src 'self') makes the browser refuse any other origin, so
// a stored API key can only ever reach this server.
//
// Image tasks (image to image, inpaint, ControlNet) post the input image, loaded by
// playground-inputs.js, as a data URI to the task's own slug; the result shows beside it.
"use strict";

(() => {
  const STORAGE = {
    key: "zimage.playground.apiKey",
    history: "zimage.playground.history",
    settings: "zimage.playground.settings",
  };
  const HISTORY_LIMIT = 12;
  const THUMB_EDGE = 160;
  const MIME = { webp: "image/webp", png: "image/png", jpeg: "image/jpeg" };
  const MAX_SEED = (1n << 63n) - 1n;
  const PREVIEW_SIZE = 256; // longer side of the step previews a render streams
  // Each task: its slug, whether it needs an input image and a mask, its default strength.
  const TASKS = {
    "text-to-image": { slug: "z-image-turbo", label: "Text to image", note: "An image from the prompt alone." },
    img2img: {
      slug: "z-image-turbo-img2img", label: "Image to image", image: true, strength: 0.6,
      note: "Redraws the input image after the prompt; strength says how far.",
    },
    inpaint: {
      slug: "z-image-turbo-inpaint", label: "Inpaint", image: true, mask: true, strength: 1,
      note: "Repaints the area you paint on the input image; keeps the rest.",
    },
    controlnet: {
      slug: "z-image-turbo-controlnet", label: "ControlNet", image: true, controlnet: true,
      note: "Follows the structure of a control image (edges, for example).",
    },
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    statusText: $("status-text"),
    keyButton: $("key-button"),
    form: $("controls"),
    prompt: $("prompt"),
    presets: $("presets"),
    width: $("width"),
    height: $("height"),
    swap: $("swap"),
    steps: $("steps"),
    stepsValue: $("steps-value"),
    seed: $("seed"),
    seedRandom: $("seed-random"),
    generate: $("generate"),
    generateLabel: $("generate-label"),
    modKey: $("mod-key"),
    stage: $("stage"),
    placeholder: $("placeholder"),
    result: $("result"),
    previewBadge: $("preview-badge"),
    progress: $("progress"),
    progressText: $("progress-text"),
    progressFill: $("progress-fill"),
    elapsed: $("elapsed"),
    error: $("error"),
    errorTitle: $("error-title"),
    errorText: $("error-text"),
    errorClose: $("error-close"),
    meta: $("meta"),
    resultSeed: $("result-seed"),
    resultSize: $("result-size"),
    resultTime: $("result-time"),
    resultFormat: $("result-format"),
    reuseSeed: $("reuse-seed"),
    download: $("download"),
    history: $("history"),
    historyEmpty: $("history-empty"),
    clearHistory: $("clear-history"),
    keyDialog: $("key-dialog"),
    keyForm: $("key-form"),
    keyReason: $("key-reason"),
    keyInput: $("key-input"),
    keyForget: $("key-forget"),
    keyCancel: $("key-cancel"),
    workspace: $("workspace"),
    taskNote: $("task-note"),
    inputPane: $("input-pane"),
    inputSize: $("input-size"),
    strengthField: $("strength-field"),
    strength: $("strength"),
    strengthValue: $("strength-value"),
    controlnetField: $("controlnet-field"),
    cnScale: $("cn-scale"),
    cnScaleValue: $("cn-scale-value"),
    controlType: $("control-type"),
    cnInpaint: $("cn-inpaint"),
    maskOverlay: $("mask-overlay"),
    maskTools: $("mask-tools"),
    maskNote: $("mask-note"),
    brushSize: $("brush-size"),
    brushSizeValue: $("brush-size-value"),
    imageFile: $("image-file"),
    dropzone: $("dropzone"),
  };

  const state = {
    authRequired: false,
    busy: false,
    ranges: {
      width: { min: 256, max: 2048 },
      height: { min: 256, max: 2048 },
      steps: { min: 1, max: 75 },
    },
    shown: null, // the result or history entry on the stage
    invalidInput: null, // the field a validation error points at
    objectUrl: null,
    history: [],
    retryAfterKey: false, // a generate that asked for a key runs again once one is saved
    strength: { img2img: TASKS.img2img.strength, inpaint: TASKS.inpaint.strength },
  };

  // ---------- storage (never throws: private modes and full quotas just lose the data) ----------

  function readJson(name, fallback) {
    try {
      const raw = localStorage.getItem(name);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  }

  function writeJson(name, value) {
    try {
      localStorage.setItem(name, JSON.stringify(value));
      return true;
    } catch {
      return false;
    }
  }

  function getKey() {
    try {
      return localStorage.getItem(STORAGE.key) || "";
    } catch {
      return "";
    }
  }

  function setKey(value) {
    try {
      if (value) localStorage.setItem(STORAGE.key, value);
      else localStorage.removeItem(STORAGE.key);
    } catch {
      /* storage unavailable: the key lives for this page only */
    }
    renderKeyButton();
    if (value) loadLoras();
  }

  // ---------- talking to this server (same origin only) ----------

  function api(path, init = {}) {
    // Relative paths only: no scheme, no host, no "//" that would leave this origin.
    if (!/^[a-z][\w.-]*(\/[\w.-]+)*$/i.test(path)) throw new Error("the playground only talks to its own server");
    const headers = new Headers(init.headers || {});
    const key = getKey();
    if (key) headers.set("x-api-key", key);
    return fetch(path, {
      ...init,
      headers,
      credentials: "same-origin",
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
  }

  async function errorMessage(response) {
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") return body.error;
      if (body && body.error && typeof body.error.message === "string") return body.error.message;
      if (body && typeof body.detail === "string") return body.detail;
    } catch {
      /* not JSON */
    }
    return text.trim().slice(0, 300) || response.statusText || "no details";
  }

  // ---------- status pill and server info ----------

  function setStatus(kind, text, title) {
    el.status.dataset.state = kind;
    el.statusText.textContent = text;
    el.status.title = title || "";
  }

  let modelLabel = "";

  async function loadInfo() {
    let info;
    try {
      const response = await api("info");
      if (!response.ok) throw new Error(`${response.status} ${await errorMessage(response)}`);
      info = await response.json();
    } catch (err) {
      setStatus("unreachable", "Server unreachable", String(err));
      showError("Cannot reach the server", `GET /info failed: ${err.message || err}`);
      el.error.dataset.cause = "unreachable";
      setTimeout(loadInfo, 5000);
      return;
    }
    modelLabel = info.weights || info.model || "";
    state.authRequired = Boolean(info.auth_required);
    applyRanges(info.parameters || {});
    renderKeyButton();
    document.body.dataset.auth = state.authRequired ? "required" : "off";
    document.body.dataset.ready = "true";
    if (state.authRequired && !getKey()) openKeyDialog("This server needs an API key to generate images.");
    pollReadiness();
    loadLoras();
  }

  // Readiness is polled for as long as the page is open: every 5 s while ready, backing off
  // from 1 s to 15 s while not, so the pill never says Ready for a server that is gone.
  const READY_POLL_MS = 5000;
  const MAX_POLL_MS = 15000;
  const NOT_READY = {
    STARTING: ["loading", "Starting: loading the model…"],
    BUSY: ["busy", "Busy: queue full"],
    DRAINING: ["error", "Shutting down"],
    FAILED: ["error", "Model failed to load"],
    UNAVAILABLE: ["error", "Database unavailable"],
  };
  const poll = { timer: null, delay: 1000, running: false };

  async function pollReadiness() {
    if (poll.running) return;
    poll.running = true;
    clearTimeout(poll.timer);
    let ready = false;
    try {
      const response = await api("readyz", { signal: AbortSignal.timeout(5000) });
      const body = await response.json().catch(() => ({}));
      ready = response.ok;
      const [kind, text] = ready ? ["ready", "Ready"] : NOT_READY[body.status] || ["loading", "Not ready"];
      if (ready) setStatus(kind, modelLabel ? `${text} · ${modelLabel}` : text, modelLabel);
      if (ready && el.error.dataset.cause === "unreachable") hideError();
      else setStatus(kind, text, body.reason || "");
    } catch (err) {
      setUnreachable(err);
    } finally {
      poll.running = false;
    }
    poll.delay = ready ? 1000 : Math.min(poll.delay * 2, MAX_POLL_MS);
    poll.timer = setTimeout(pollReadiness, ready ? READY_POLL_MS : poll.delay);
  }

  function setUnreachable(err) {
    setStatus("unreachable", "Server unreachable", `No answer from the server: ${err && err.message ? err.message : err}`);
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden) pollReadiness(); });
  window.addEventListener("online", () => pollReadiness());

  function applyRanges(parameters) {
    for (const name of ["width", "height", "steps"]) {
      const spec = parameters[name];
      if (!spec) continue;
      const range = state.ranges[name];
      if (Number.isInteger(spec.minimum)) range.min = spec.minimum;
      if (Number.isInteger(spec.maximum)) range.max = spec.maximum;
      el[name].min = String(range.min);
      el[name].max = String(range.max);
    }
    const defaults = parameters.steps && parameters.steps.default;
    if (Number.isInteger(defaults) && !readJson(STORAGE.settings, null)) el.steps.value = String(defaults);
    updateSteps();
  }

  // ---------- API key ----------

  function renderKeyButton() {
    const key = getKey();
    el.keyButton.hidden = !state.authRequired && !key;
    el.keyButton.textContent = key ? `Key ···${key.slice(-4)}` : "Set API key";
    el.keyButton.title = key ? "Change or forget the API key" : "Enter an API key";
    el.keyForget.hidden = !key;
  }

  function openKeyDialog(reason, tone) {
    el.keyReason.textContent = reason || "Enter the API key for this server.";
    el.keyReason.dataset.tone = tone || "";
    el.keyInput.value = "";
    el.keyInput.placeholder = getKey() ? `current key ends in ${getKey().slice(-4)}` : "zk_…";
    el.keyForget.hidden = !getKey();
    if (!el.keyDialog.open) el.keyDialog.showModal();
    el.keyInput.focus();
  }

  el.keyButton.addEventListener("click", () => openKeyDialog());
  el.keyCancel.addEventListener("click", () => {
    state.retryAfterKey = false;
    el.keyDialog.close();
  });
  el.keyDialog.addEventListener("cancel", () => { state.retryAfterKey = false; });
  el.keyForget.addEventListener("click", () => {
    setKey("");
    openKeyDialog("Key forgotten. Enter another one, or cancel.");
  });
  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = el.keyInput.value.trim();
    if (!value) {
      el.keyInput.setAttribute("aria-invalid", "true");
      el.keyInput.focus();
      return;
    }
    el.keyInput.removeAttribute("aria-invalid");
    setKey(value);
    el.keyDialog.close();
    hideError();
    if (state.retryAfterKey) {
      state.retryAfterKey = false;
      generate();
    }
  });

  // ---------- form ----------

  function presetButtons() {
    return Array.from(el.presets.querySelectorAll(".preset"));
  }

  for (const button of presetButtons()) {
    const w = Number(button.dataset.w);
    const h = Number(button.dataset.h);
    const shape = button.querySelector(".shape");
    // CSSOM, not a style attribute: the page's CSP forbids inline styles.
    shape.style.aspectRatio = `${w} / ${h}`;
    shape.style.width = w >= h ? "26px" : `${Math.round((26 * w) / h)}px`;
    if (w === 512) shape.style.width = "16px";
    button.title = `${w} × ${h}`;
    button.addEventListener("click", () => {
      el.width.value = String(w);
      el.height.value = String(h);
      syncSize();
      saveSettings();
    });
  }

  function syncSize() {
    const w = Number(el.width.value);
    const h = Number(el.height.value);
    for (const button of presetButtons()) {
      const match = Number(button.dataset.w) === w && Number(button.dataset.h) === h;
      button.setAttribute("aria-pressed", String(match));
    }
    for (const input of [el.width, el.height]) input.removeAttribute("aria-invalid");
  }

  el.width.addEventListener("input", () => { syncSize(); saveSettings(); });
  el.height.addEventListener("input", () => { syncSize(); saveSettings(); });
  el.swap.addEventListener("click", () => {
    [el.width.value, el.height.value] = [el.height.value, el.width.value];
    syncSize();
    saveSettings();
  });

  function updateSteps() {
    el.stepsValue.textContent = el.steps.value;
    const min = Number(el.steps.min);
    const max = Number(el.steps.max);
    const fill = ((Number(el.steps.value) - min) / Math.max(1, max - min)) * 100;
    el.steps.style.setProperty("--fill", `${fill}%`);
  }
  el.steps.addEventListener("input", () => { updateSteps(); saveSettings(); });

  function setRandomSeed(random) {
    el.seedRandom.checked = random;
    el.seed.disabled = random;
    el.seed.placeholder = random ? "random" : "e.g. 42";
    el.seed.removeAttribute("aria-invalid");
    if (!random && !el.seed.value && state.shown) el.seed.value = state.shown.seed;
  }
  el.seedRandom.addEventListener("change", () => {
    setRandomSeed(el.seedRandom.checked);
    if (!el.seedRandom.checked) el.seed.focus();
    saveSettings();
  });
  el.seed.addEventListener("input", () => { el.seed.removeAttribute("aria-invalid"); saveSettings(); });
  el.prompt.addEventListener("input", () => { el.prompt.removeAttribute("aria-invalid"); saveSettings(); });

  function selectedFormat() {
    const checked = el.form.querySelector('input[name="format"]:checked');
    return checked ? checked.value : "webp";
  }

  function setFormat(format) {
    for (const radio of el.form.querySelectorAll('input[name="format"]')) radio.checked = radio.value === format;
  }
  for (const radio of el.form.querySelectorAll('input[name="format"]')) {
    radio.addEventListener("change", saveSettings);
  }

  // ---------- task and input image ----------

  function selectedTask() {
    const checked = el.form.querySelector('input[name="task"]:checked');
    return checked && Object.hasOwn(TASKS, checked.value) ? checked.value : "text-to-image";
  }

  function masking(task) {
    return Boolean(TASKS[task].mask || (TASKS[task].controlnet && el.cnInpaint.checked));
  }

  // Shows what the task needs and nothing else: the input beside the result, its sliders.
  function setTask(task) {
    if (!Object.hasOwn(TASKS, task)) task = "text-to-image";
    for (const radio of el.form.querySelectorAll('input[name="task"]')) radio.checked = radio.value === task;
    const spec = TASKS[task];
    el.workspace.dataset.task = task;
    el.taskNote.textContent = spec.note;
    el.inputPane.hidden = !spec.image;
    el.strengthField.hidden = !Object.hasOwn(state.strength, task);
    if (!el.strengthField.hidden) el.strength.value = String(state.strength[task]);
    updateRange(el.strength, el.strengthValue, 2);
    el.controlnetField.hidden = !spec.controlnet;
    el.maskOverlay.hidden = !masking(task);
    el.maskTools.hidden = !masking(task);
  }

  function updateRange(input, output, digits) {
    output.textContent = Number(input.value).toFixed(digits);
    const min = Number(input.min);
    const max = Number(input.max);
    input.style.setProperty("--fill", `${((Number(input.value) - min) / Math.max(1e-9, max - min)) * 100}%`);
  }

  for (const radio of el.form.querySelectorAll('input[name="task"]')) {
    radio.addEventListener("change", () => { setTask(selectedTask()); saveSettings(); });
  }
  el.strength.addEventListener("input", () => {
    const task = selectedTask();
    if (Object.hasOwn(state.strength, task)) state.strength[task] = Number(el.strength.value);
    updateRange(el.strength, el.strengthValue, 2);
    saveSettings();
  });
  el.cnScale.addEventListener("input", () => { updateRange(el.cnScale, el.cnScaleValue, 2); saveSettings(); });
  el.controlType.addEventListener("change", saveSettings);
  el.cnInpaint.addEventListener("change", () => { setTask(selectedTask()); saveSettings(); });
  el.brushSize.addEventListener("input", () => updateRange(el.brushSize, el.brushSizeValue, 0));

  // The input's own size brought into the allowed sides, keeping its shape: what the
  // server does when a request names no size (images/inputs.py default_size).
  function defaultSize(width, height) {
    const { min, max } = state.ranges.width;
    let scale = Math.min(1, max / Math.max(width, height));
    scale = Math.max(scale, min / Math.min(width, height));
    const side = (value) => Math.min(max, Math.max(min, Math.round(value * scale)));
    return [side(width), side(height)];
  }

  const inputs = window.ZImageInputs.create(
    {
      canvas: $("input-canvas"),
      overlay: el.maskOverlay,
      mask: $("mask"),
      wrap: $("canvas-wrap"),
      dropzone: el.dropzone,
      file: el.imageFile,
      maskFile: $("mask-file"),
      clear: $("mask-clear"),
      tools: el.maskTools,
      brushSize: el.brushSize,
    },
    {
      onError: showError,
      onWantImage: () => {
        if (!TASKS[selectedTask()].image) {
          setTask("img2img");
          saveSettings();
        }
      },
      onLoad: ({ width, height, name }) => {
        hideError();
        el.imageFile.removeAttribute("aria-invalid");
        [el.width.value, el.height.value] = defaultSize(width, height).map(String);
        syncSize();
        saveSettings();
        el.inputSize.textContent = `${width} × ${height}`;
        el.inputSize.title = name;
        el.maskNote.textContent = "Paint what to repaint; the rest is kept.";
      },
      // Painting fixes an empty mask: the error that pointed at it goes.
      onPaint: () => { if (state.invalidInput === el.maskOverlay) hideError(); },
      onMaskLoaded: (width, height) => {
        if (state.invalidInput === el.maskOverlay) hideError();
        const size = inputs.size();
        el.maskNote.textContent = width === size.width && height === size.height
          ? "Mask loaded: white is repainted."
          : `Mask loaded: ${width} × ${height}, stretched to the image's ${size.width} × ${size.height}.`;
      },
    },
  );

  // The fields of an image task: the input as a data URI, the mask as a black and white
  // PNG of the same size, and the task's own settings.
  function taskFields(task) {
    const spec = TASKS[task];
    if (!spec.image) return {};
    if (!spec.controlnet) {
      const fields = { image: inputs.imageDataUrl(), strength: Number(el.strength.value) };
      return spec.mask ? { ...fields, mask_image: inputs.maskDataUrl() } : fields;
    }
    const fields = {
      control_image: inputs.imageDataUrl(),
      controlnet_conditioning_scale: Number(el.cnScale.value),
      control_type: el.controlType.value,
    };
    return masking(task) ? { ...fields, image: inputs.imageDataUrl(), mask_image: inputs.maskDataUrl() } : fields;
  }

  function saveSettings() {
    writeJson(STORAGE.settings, {
      prompt: el.prompt.value,
      width: el.width.value,
      height: el.height.value,
      steps: el.steps.value,
      seed: el.seed.value,
      random: el.seedRandom.checked,
      format: selectedFormat(),
      task: selectedTask(),
      strength: state.strength,
      cnScale: el.cnScale.value,
      controlType: el.controlType.value,
      cnInpaint: el.cnInpaint.checked,
    });
  }

  function restoreSettings() {
    const saved = readJson(STORAGE.settings, null);
    if (saved && typeof saved === "object") {
      if (typeof saved.prompt === "string") el.prompt.value = saved.prompt;
      if (saved.width) el.width.value = String(saved.width);
      if (saved.height) el.height.value = String(saved.height);
      if (saved.steps) el.steps.value = String(saved.steps);
      if (typeof saved.seed === "string") el.seed.value = saved.seed;
      if (saved.format in MIME) setFormat(saved.format);
      setRandomSeed(saved.random !== false);
      restoreTaskSettings(saved);
    } else {
      setRandomSeed(true);
    }
    setTask(typeof saved?.task === "string" ? saved.task : "text-to-image");
    updateRange(el.cnScale, el.cnScaleValue, 2);
    updateRange(el.brushSize, el.brushSizeValue, 0);
    syncSize();
    updateSteps();
  }

  function restoreTaskSettings(saved) {
    for (const task of Object.keys(state.strength)) {
      const value = saved.strength && Number(saved.strength[task]);
      if (Number.isFinite(value) && value >= 0 && value <= 1) state.strength[task] = value;
    }
    if (saved.cnScale) el.cnScale.value = String(saved.cnScale);
    if (["none", "canny"].includes(saved.controlType)) el.controlType.value = saved.controlType;
    el.cnInpaint.checked = saved.cnInpaint === true;
  }

  function invalid(input, title, message) {
    input.setAttribute("aria-invalid", "true");
    state.invalidInput = input;
    input.focus();
    showError(title, message);
    return null;
  }

  function intInRange(input, name) {
    const { min, max } = state.ranges[name];
    const text = input.value.trim();
    const value = Number(text);
    if (!/^\d+$/.test(text) || value < min || value > max) {
      return invalid(input, `Invalid ${name}`, `${name[0].toUpperCase()}${name.slice(1)} must be a whole number from ${min} to ${max}.`);
    }
    return value;
  }

  function readForm() {
    const prompt = el.prompt.value.trim();
    if (!prompt) return invalid(el.prompt, "Prompt is empty", "Describe the image you want first.");
    const width = intInRange(el.width, "width");
    if (width === null) return null;
    const height = intInRange(el.height, "height");
    if (height === null) return null;
    const steps = intInRange(el.steps, "steps");
    if (steps === null) return null;
    let seed = "-1";
    if (!el.seedRandom.checked) {
      const text = el.seed.value.trim();
      if (!/^\d{1,19}$/.test(text) || BigInt(text) > MAX_SEED) {
        return invalid(el.seed, "Invalid seed", "The seed must be a whole number from 0 to 2^63 − 1, or switch on Random.");
      }
      seed = BigInt(text).toString();
    }
    const task = selectedTask();
    if (TASKS[task].image && !inputs.hasImage()) {
      el.dropzone.scrollIntoView({ block: "nearest" });
      return invalid(el.imageFile, "No input image", `${TASKS[task].label} starts from an image: choose one, drop it on the drop zone, or paste it.`);
    }
    if (masking(task) && inputs.maskIsEmpty()) {
      return invalid(el.maskOverlay, "Nothing to repaint", "The mask is empty: paint over the area to repaint with the brush, or upload a mask.");
    }
    return { prompt, width, height, steps, seed, format: selectedFormat(), task };
  }

  // ---------- generation ----------

  let ticker = null;

  function setBusy(busy, started) {
    state.busy = busy;
    el.generate.disabled = busy;
    el.generate.setAttribute("aria-busy", String(busy));
    el.generateLabel.textContent = busy ? "Generating…" : "Generate";
    el.progress.hidden = !busy;
    el.stage.dataset.state = busy ? "busy" : state.shown ? (state.shown.preview ? "preview" : "result") : "empty";
    clearInterval(ticker);
    if (busy) {
      const tick = () => { el.elapsed.textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`; };
      tick();
      ticker = setInterval(tick, 100);
    }
  }

  function requestBody(params) {
    // The seed is spliced in as text: JSON numbers in JS lose precision above 2^53.
    const json = JSON.stringify({
      seed: 0,
      prompt: params.prompt,
      width: params.width,
      height: params.height,
      steps: params.steps,
      image_format: params.format,
      base_64: true,
      preview_size: PREVIEW_SIZE,
      ...loraFields(),
      ...taskFields(params.task),
    });
    return json.replace('{"seed":0,', `{"seed":${params.seed},`);
  }

  function base64ToBlob(data, type) {
    const binary = atob(data);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
    return new Blob([bytes], { type });
  }

  async function generate() {
    if (state.busy) return;
    hideError();
    const params = readForm();
    if (!params) return;
    if (state.authRequired && !getKey()) {
      state.retryAfterKey = true;
      openKeyDialog("Enter an API key to generate images on this server.");
      return;
    }
    saveSettings();
    const started = performance.now();
    setBusy(true, started);
    resetProgress();
    try {
      const response = await api(`v1/${TASKS[params.task].slug}`, {
        method: "POST",
        // An event stream: the queue position, each step and its preview, then the body.
        headers: { "Content-Type": "application/json", Accept: "text/event-stream, application/json;q=0.5" },
        body: requestBody(params),
      }).catch((err) => {
        // fetch() rejects only when no answer came back at all: the server is down.
        setUnreachable(err);
        pollReadiness();
        return null;
      });
      if (!response) {
        showError("Cannot reach the server", "The request got no answer: the server may be down or restarting. The status turns to Ready when it is back.");
        el.error.dataset.cause = "unreachable";
        return;
      }
      if (!response.ok) {
        await handleFailure(response);
        return;
      }
      const streamed = (response.headers.get("Content-Type") || "").startsWith("text/event-stream");
      const text = streamed ? await readStream(response) : await response.text();
      if (text === null) return; // the stream ended with an error, shown already
      const data = JSON.parse(text);
      // Read the seed from the text too, so seeds above 2^53 survive exactly.
      const seedMatch = /"seed"\s*:\s*(\d+)/.exec(text);
      const format = data.image_format || params.format;
      const blob = base64ToBlob(data.image, MIME[format] || "application/octet-stream");
      const url = URL.createObjectURL(blob);
      await showImage(url);
      const wall = (performance.now() - started) / 1000;
      const entry = {
        id: `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`,
        prompt: params.prompt,
        seed: seedMatch ? seedMatch[1] : String(data.seed),
        width: data.width || params.width,
        height: data.height || params.height,
        steps: params.steps,
        task: params.task,
        format,
        serverTime: typeof data.generation_time === "number" ? data.generation_time : null,
        wallTime: wall,
        bytes: blob.size,
        at: Date.now(),
        thumb: makeThumb(el.result),
      };
      replaceObjectUrl(url);
      state.shown = { ...entry, preview: false };
      renderMeta();
      addToHistory(entry);
      if (window.matchMedia("(max-width: 820px)").matches) el.stage.scrollIntoView({ block: "start" });
    } catch (err) {
      showError("Something went wrong", err && err.message ? err.message : String(err));
    } finally {
      setBusy(false);
    }
  }

  async function handleFailure(response) {
    const message = await errorMessage(response);
    reportFailure(response.status, message, response.headers.get("Retry-After"));
  }

  function reportFailure(status, message, retry) {
    const suffix = retry ? ` Try again in ${retry} s.` : "";
    const titles = {
      400: "Invalid request",
      401: "API key needed",
      403: "API key not allowed",
      404: "Not available on this server",
      406: "Not enough credits",
      413: "Too large",
      429: "Busy: too many requests",
      502: "The worker restarted",
      503: "Model still loading",
      504: "Timed out",
    };
    const title = `${titles[status] || "Generation failed"} (${status})`;
    showError(title, message + suffix);
    if (status === 401 || status === 403) {
      state.retryAfterKey = true;
      openKeyDialog(`The server said: ${message}`, "error");
    }
  }

  // ---------- live progress: server-sent events read from fetch (EventSource cannot POST) ----------

  function resetProgress() {
    el.progress.dataset.mode = "waiting";
    el.progressText.textContent = "Sending…";
    el.progressFill.style.width = "";
    el.progressFill.parentElement.removeAttribute("aria-valuenow");
  }

  // The data of the stream's `completed` event (the v1 JSON body), or null once a `failed`
  // or `cancelled` event has been shown as an error.
  async function readStream(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the server ended the stream before the image");
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = parseFrame(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!frame) continue;
        if (frame.event === "completed") return frame.data;
        if (frame.event === "failed" || frame.event === "cancelled") {
          const body = JSON.parse(frame.data);
          const message = typeof body.error === "string" ? body.error : "the render was cancelled";
          reportFailure(body.status_code || 500, message, null);
          return null;
        }
        showProgress(frame.event, JSON.parse(frame.data));
      }
    }
  }

  // One SSE frame as {event, data}; comments (keep-alives) and `retry` alone give null.
  function parseFrame(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  function showProgress(kind, data) {
    if (kind === "queued") {
      el.progress.dataset.mode = "waiting";
      el.progressText.textContent = data.queue_position ? `Queued · position ${data.queue_position}` : "Queued";
      return;
    }
    if (kind !== "started" && kind !== "step") return;
    const total = Number(data.total) || 0;
    const step = Number(data.step) || 0;
    el.progress.dataset.mode = "steps";
    el.progressText.textContent = `Step ${step} / ${total}`;
    el.progressFill.style.width = `${total ? (100 * step) / total : 0}%`;
    el.progressFill.parentElement.setAttribute("aria-valuenow", String(total ? Math.round((100 * step) / total) : 0));
    if (data.preview && typeof data.preview.image === "string") showPreview(data.preview.image, step);
  }

  // Each step's preview replaces the last one: the image sharpens as it renders.
  function showPreview(base64, step) {
    el.result.onload = null;
    el.result.onerror = null;
    el.result.src = `data:image/webp;base64,${base64}`;
    el.result.dataset.step = String(step);
    el.result.hidden = false;
    el.placeholder.hidden = true;
    el.previewBadge.hidden = true;
    el.download.hidden = true;
    el.stage.dataset.state = "streaming";
  }

  function showImage(url) {
    return new Promise((resolve, reject) => {
      const img = el.result;
      img.onload = () => resolve();
      img.onerror = () => reject(new Error("the browser could not decode the returned image"));
      img.src = url;
      img.hidden = false;
      el.placeholder.hidden = true;
    });
  }

  function replaceObjectUrl(url) {
    if (state.objectUrl && state.objectUrl !== url) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = url;
  }

  function makeThumb(img) {
    const scale = Math.min(1, THUMB_EDGE / Math.max(img.naturalWidth, img.naturalHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/jpeg", 0.8);
  }

  function formatSeconds(value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "–";
    return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(1)} s`;
  }

  function renderMeta() {
    const shown = state.shown;
    el.meta.hidden = !shown;
    if (!shown) return;
    el.resultSeed.textContent = shown.seed;
    el.resultSize.textContent = `${shown.width} × ${shown.height}`;
    const server = shown.serverTime === null ? "" : `${formatSeconds(shown.serverTime)} server · `;
    el.resultTime.textContent = `${server}${formatSeconds(shown.wallTime)} total`;
    el.resultTime.title = "Server: generation_time from the response. Total: measured in this browser.";
    el.resultFormat.textContent = shown.format.toUpperCase();
    el.previewBadge.hidden = !shown.preview;
    el.download.hidden = shown.preview;
    if (!shown.preview) {
      el.download.href = state.objectUrl;
      el.download.download = `zimage-${shown.seed}.${shown.format === "jpeg" ? "jpg" : shown.format}`;
    }
    el.stage.dataset.state = shown.preview ? "preview" : "result";
    for (const item of el.history.querySelectorAll(".history-item")) {
      item.setAttribute("aria-current", String(item.dataset.id === shown.id));
    }
  }

  el.reuseSeed.addEventListener("click", () => {
    if (!state.shown) return;
    el.seed.value = state.shown.seed;
    setRandomSeed(false);
    saveSettings();
    el.seed.focus();
  });

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });

  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !el.keyDialog.open) {
      event.preventDefault();
      generate();
    }
  });

  // ---------- errors ----------

  function showError(title, text) {
    el.errorTitle.textContent = title;
    el.errorText.textContent = text;
    el.error.dataset.cause = "";
    el.error.hidden = false;
  }

  function hideError() {
    el.error.hidden = true;
    state.invalidInput = null;
  }

  // Fixing the field that a validation error pointed at clears the error.
  el.form.addEventListener("input", (event) => {
    if (state.invalidInput && event.target === state.invalidInput) hideError();
  });
  el.errorClose.addEventListener("click", hideError);

  // ---------- history ----------

  function saveHistory() {
    // Drop the oldest entries until the thumbnails fit in the storage quota.
    while (!writeJson(STORAGE.history, state.history) && state.history.length > 0) {
      state.history.pop();
    }
  }

  function addToHistory(entry) {
    state.history = [entry, ...state.history].slice(0, HISTORY_LIMIT);
    saveHistory();
    renderHistory();
  }

  function renderHistory() {
    el.history.replaceChildren();
    for (const entry of state.history) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "history-item";
      button.dataset.id = entry.id;
      button.title = entry.prompt;
      button.setAttribute("aria-current", String(Boolean(state.shown && state.shown.id === entry.id)));
      const img = document.createElement("img");
      img.alt = "";
      img.src = typeof entry.thumb === "string" && entry.thumb.startsWith("data:image/") ? entry.thumb : "";
      const text = document.createElement("span");
      text.className = "history-text";
      const prompt = document.createElement("span");
      prompt.className = "history-prompt";
      prompt.textContent = entry.prompt;
      const meta = document.createElement("span");
      meta.className = "history-meta";
      const task = Object.hasOwn(TASKS, entry.task) && entry.task !== "text-to-image" ? ` · ${TASKS[entry.task].label}` : "";
      meta.textContent = `${entry.seed} · ${entry.width}×${entry.height}${task}`;
      text.append(prompt, meta);
      button.append(img, text);
      button.addEventListener("click", () => restoreEntry(entry));
      item.append(button);
      el.history.append(item);
    }
    el.historyEmpty.hidden = state.history.length > 0;
    el.clearHistory.hidden = state.history.length === 0;
  }

  function restoreEntry(entry) {
    if (state.busy) return;
    hideError();
    el.prompt.value = entry.prompt;
    el.width.value = String(entry.width);
    el.height.value = String(entry.height);
    el.steps.value = String(entry.steps);
    el.seed.value = entry.seed;
    setRandomSeed(false);
    if (entry.format in MIME) setFormat(entry.format);
    setTask(entry.task);
    syncSize();
    updateSteps();
    saveSettings();
    replaceObjectUrl(null);
    el.result.onload = null;
    el.result.onerror = null;
    el.result.src = entry.thumb;
    el.result.hidden = false;
    el.placeholder.hidden = true;
    state.shown = { ...entry, preview: true };
    renderMeta();
  }

  el.clearHistory.addEventListener("click", () => {
    state.history = [];
    saveHistory();
    renderHistory();
  });

  // ---------- LoRA adapters ----------
  // The installed adapters (GET /v1/loras), each with a checkbox and a scale; the checked
  // ones go into the request's "loras". Hidden when the server has none, or LoRAs are off.

  const lorasField = $("loras-field");
  const lorasList = $("loras");

  async function loadLoras() {
    let listing;
    try {
      const response = await api("v1/loras");
      if (!response.ok) return;
      listing = await response.json();
    } catch (err) {
      return;
    }
    const loras = (listing.loras || []).slice(0, 50);
    lorasList.replaceChildren(...loras.map((lora) => loraRow(lora, listing.max_scale || 4)));
    $("loras-note").textContent = `At most ${listing.max_loras} per image.`;
    lorasField.hidden = !loras.length || !listing.max_loras;
  }

  function loraRow(lora, maxScale) {
    const row = document.createElement("li");
    row.className = "lora";
    const pick = document.createElement("label");
    pick.className = "lora-pick";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = lora.name;
    box.className = "lora-on";
    const name = document.createElement("span");
    name.textContent = lora.name;
    pick.append(box, name);
    const scale = document.createElement("input");
    scale.type = "range";
    scale.className = "lora-scale";
    scale.min = "0";
    scale.max = String(maxScale);
    scale.step = "0.05";
    scale.value = "1";
    scale.setAttribute("aria-label", `Scale of ${lora.name}`);
    const shown = document.createElement("output");
    shown.className = "value";
    shown.textContent = "1.00";
    scale.addEventListener("input", () => { shown.textContent = Number(scale.value).toFixed(2); });
    row.append(pick, scale, shown);
    return row;
  }

  function loraFields() {
    const picked = [...lorasList.querySelectorAll("li.lora")]
      .filter((row) => row.querySelector(".lora-on").checked)
      .map((row) => ({ path: row.querySelector(".lora-on").value, scale: Number(row.querySelector(".lora-scale").value) }));
    return picked.length ? { loras: picked } : {};
  }

  // ---------- start ----------

  const isMac = /Mac|iPhone|iPad/.test(navigator.platform || navigator.userAgent);
  el.modKey.textContent = isMac ? "⌘" : "Ctrl";
  const stored = readJson(STORAGE.history, []);
  state.history = Array.isArray(stored) ? stored.filter((entry) => entry && entry.id).slice(0, HISTORY_LIMIT) : [];
  restoreSettings();
  renderHistory();
  renderKeyButton();
  loadInfo();
})();
