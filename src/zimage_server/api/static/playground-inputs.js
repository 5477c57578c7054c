// Z-Image playground: the input image and its mask. Plain JS, no build step.
//
// One image, loaded from the file picker, a drop on the drop zone or a paste, is drawn on a
// canvas at its own size. For inpainting a mask is painted over it with pointer events
// (mouse, pen and touch alike): the hidden #mask canvas holds what is sent, black keeps and
// white repaints (the server's convention, images/inputs.py), at the image's exact size;
// the visible overlay shows the same strokes in the accent colour.
"use strict";

window.ZImageInputs = (() => {
  const SENT_AS_IS = new Set(["image/png", "image/jpeg", "image/webp"]); // what the server reads
  const OVERLAY = "#8f7cff";
  const MAX_UPSCALE = 4; // small images are shown larger, but not as a blur of pixels

  function readAsDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result));
      reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
      reader.readAsDataURL(file);
    });
  }

  function decode(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the browser could not decode it as an image"));
      img.src = url;
    });
  }

  // The first image among a drop's or a paste's files, or null (text pastes stay text).
  function imageFile(transfer) {
    if (!transfer) return null;
    const files = [...(transfer.files || [])];
    for (const item of transfer.items || []) {
      if (item.kind === "file") files.push(item.getAsFile());
    }
    return files.find((file) => file && file.type.startsWith("image/")) || null;
  }

  function create(el, hooks) {
    const input = { dataUrl: "", name: "", width: 0, height: 0 };
    const paint = { pointer: null, last: null };
    const maskCtx = el.mask.getContext("2d", { willReadFrequently: true });
    const viewCtx = el.overlay.getContext("2d");

    async function load(file, source) {
      if (!file || !file.type.startsWith("image/")) {
        hooks.onError("Not an image", `${file ? file.name || "That file" : "Nothing"} is not an image: use a PNG, JPEG or WebP.`);
        return false;
      }
      let img;
      let url;
      try {
        url = await readAsDataUrl(file);
        img = await decode(url);
      } catch (err) {
        hooks.onError("Cannot read the image", `${file.name || "The image"}: ${err.message || err}.`);
        return false;
      }
      const width = img.naturalWidth;
      const height = img.naturalHeight;
      el.canvas.width = width;
      el.canvas.height = height;
      el.canvas.getContext("2d").drawImage(img, 0, 0);
      // PNG, JPEG and WebP go as they came (no re-encoding loss); others become PNG.
      input.dataUrl = SENT_AS_IS.has(file.type) ? url : el.canvas.toDataURL("image/png");
      Object.assign(input, { name: file.name || source, width, height });
      for (const canvas of [el.mask, el.overlay]) {
        canvas.width = width;
        canvas.height = height;
      }
      clearMask();
      el.wrap.hidden = false;
      el.dropzone.dataset.state = "loaded";
      fit();
      hooks.onLoad({ width, height, name: input.name, source });
      return true;
    }

    // The canvases shown as large as the drop zone allows, keeping the image's shape.
    function fit() {
      if (!input.width) return;
      const box = el.dropzone.getBoundingClientRect();
      const room = { w: Math.max(1, box.width - 24), h: Math.max(1, box.height - 24) };
      const scale = Math.min(room.w / input.width, room.h / input.height, MAX_UPSCALE);
      el.wrap.style.width = `${Math.round(input.width * scale)}px`;
      el.wrap.style.height = `${Math.round(input.height * scale)}px`;
    }

    // ---------- mask ----------

    function clearMask() {
      maskCtx.globalCompositeOperation = "source-over";
      maskCtx.fillStyle = "#000";
      maskCtx.fillRect(0, 0, el.mask.width, el.mask.height);
      viewCtx.clearRect(0, 0, el.overlay.width, el.overlay.height);
    }

    function tool() {
      const checked = el.tools.querySelector('input[name="mask-tool"]:checked');
      return checked ? checked.value : "brush";
    }

    // A pointer position in image pixels, and the brush width (set in screen pixels).
    function at(event) {
      const rect = el.overlay.getBoundingClientRect();
      const scale = el.overlay.width / rect.width;
      return {
        x: (event.clientX - rect.left) * scale,
        y: (event.clientY - rect.top) * scale,
        width: Number(el.brushSize.value) * scale,
      };
    }

    // The same stroke on both canvases: white (or black) on the mask, colour (or a hole) on
    // the overlay, whose CSS opacity keeps overlapping strokes one even tint.
    function stroke(from, to) {
      const erase = tool() === "eraser";
      const targets = [
        [maskCtx, erase ? "#000" : "#fff", "source-over"],
        [viewCtx, OVERLAY, erase ? "destination-out" : "source-over"],
      ];
      for (const [ctx, colour, mode] of targets) {
        ctx.globalCompositeOperation = mode;
        ctx.strokeStyle = colour;
        ctx.fillStyle = colour;
        ctx.lineWidth = to.width;
        ctx.lineCap = "round";
        ctx.lineJoin = "round";
        ctx.beginPath();
        if (from) {
          ctx.moveTo(from.x, from.y);
          ctx.lineTo(to.x, to.y);
          ctx.stroke();
        } else {
          ctx.arc(to.x, to.y, to.width / 2, 0, 2 * Math.PI);
          ctx.fill();
        }
      }
    }

    el.overlay.addEventListener("pointerdown", (event) => {
      if (event.pointerType === "mouse" && event.button !== 0) return;
      event.preventDefault();
      el.overlay.setPointerCapture(event.pointerId);
      paint.pointer = event.pointerId;
      paint.last = at(event);
      stroke(null, paint.last);
    });
    el.overlay.addEventListener("pointermove", (event) => {
      if (paint.pointer !== event.pointerId) return;
      const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
      for (const each of events.length ? events : [event]) {
        const point = at(each);
        stroke(paint.last, point);
        paint.last = point;
      }
    });
    for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) {
      el.overlay.addEventListener(name, (event) => {
        if (paint.pointer !== event.pointerId) return;
        paint.pointer = null;
        hooks.onPaint(); // after the stroke: what it changes on the page cannot move the canvas mid-stroke
      });
    }

    // An uploaded mask, read as the server reads one: transparency over white, then grey
    // at half or above repaints. A mask of another size is stretched to the image's.
    async function loadMask(file) {
      if (!input.width) {
        hooks.onError("No input image", "Load the image first, then its mask.");
        return;
      }
      let img;
      try {
        img = await decode(await readAsDataUrl(file));
      } catch (err) {
        hooks.onError("Cannot read the mask", `${file.name || "The mask"}: ${err.message || err}.`);
        return;
      }
      const { width, height } = el.mask;
      maskCtx.globalCompositeOperation = "source-over";
      maskCtx.fillStyle = "#fff";
      maskCtx.fillRect(0, 0, width, height);
      maskCtx.drawImage(img, 0, 0, width, height);
      const pixels = maskCtx.getImageData(0, 0, width, height);
      const view = viewCtx.createImageData(width, height);
      const [r, g, b] = [0x8f, 0x7c, 0xff];
      for (let i = 0; i < pixels.data.length; i += 4) {
        const d = pixels.data;
        const on = (d[i] * 299 + d[i + 1] * 587 + d[i + 2] * 114) / 1000 >= 128;
        d[i] = d[i + 1] = d[i + 2] = on ? 255 : 0;
        d[i + 3] = 255;
        view.data.set(on ? [r, g, b, 255] : [0, 0, 0, 0], i);
      }
      maskCtx.putImageData(pixels, 0, 0);
      viewCtx.putImageData(view, 0, 0);
      hooks.onMaskLoaded(img.naturalWidth, img.naturalHeight);
    }

    function maskIsEmpty() {
      const { data } = maskCtx.getImageData(0, 0, el.mask.width, el.mask.height);
      for (let i = 0; i < data.length; i += 4) if (data[i] >= 128) return false;
      return true;
    }

    // ---------- sources: the file pickers, a drop, a paste ----------

    el.file.addEventListener("change", () => {
      const [file] = el.file.files;
      if (file) load(file, "file");
      el.file.value = ""; // choosing the same file again loads it again
    });
    el.maskFile.addEventListener("change", () => {
      const [file] = el.maskFile.files;
      if (file) loadMask(file);
      el.maskFile.value = "";
    });
    el.clear.addEventListener("click", clearMask);

    const carriesFiles = (event) => [...(event.dataTransfer ? event.dataTransfer.types : [])].includes("Files");
    for (const name of ["dragenter", "dragover"]) {
      el.dropzone.addEventListener(name, (event) => {
        if (!carriesFiles(event)) return;
        event.preventDefault();
        event.dataTransfer.dropEffect = "copy";
        el.dropzone.dataset.drag = "over";
      });
    }
    el.dropzone.addEventListener("dragleave", () => { delete el.dropzone.dataset.drag; });
    el.dropzone.addEventListener("drop", (event) => {
      event.preventDefault();
      delete el.dropzone.dataset.drag;
      const file = imageFile(event.dataTransfer);
      if (file) load(file, "drop");
      else hooks.onError("Not an image", "Drop a PNG, JPEG or WebP image file.");
    });
    // A file dropped beside the zone must not replace the page with the file.
    window.addEventListener("dragover", (event) => { if (carriesFiles(event)) event.preventDefault(); });
    window.addEventListener("drop", (event) => { if (carriesFiles(event)) event.preventDefault(); });

    document.addEventListener("paste", (event) => {
      const file = imageFile(event.clipboardData);
      if (!file) return; // text goes where it was pasted
      event.preventDefault();
      hooks.onWantImage();
      load(file, "paste");
    });

    new ResizeObserver(fit).observe(el.dropzone);

    return {
      load,
      fit,
      clearMask,
      maskIsEmpty,
      hasImage: () => Boolean(input.dataUrl),
      imageDataUrl: () => input.dataUrl,
      maskDataUrl: () => el.mask.toDataURL("image/png"),
      size: () => ({ width: input.width, height: input.height }),
    };
  }

  return { create };
})();
