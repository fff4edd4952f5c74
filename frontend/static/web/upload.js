// Image upload: create the image through the API, then stream the file with a PUT and show progress.
// Errors are shown next to the form, whose values stay; a failed file upload can be sent again
// into the same image (it stays "queued").
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const csrf = JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRFToken"] || "";
  const banner = document.getElementById("upload-error");
  const bar = document.getElementById("upload-progress");
  const barField = document.getElementById("upload-progress-field");
  const statusLine = document.getElementById("upload-status");
  const submit = document.getElementById("upload-submit");
  let imageId = null; // kept across a retry

  // Every field's error at once, next to its field, with aria-invalid and aria-describedby;
  // the summary above the form takes the focus, so keyboard and screen reader users land on it.
  function showErrors(message, fields) {
    banner.textContent = message || "";
    banner.hidden = !message;
    form.querySelectorAll("[data-for]").forEach(function (p) {
      const msgs = (fields || {})[p.dataset.for];
      const input = form.elements[p.dataset.for];
      p.id = p.id || "err-" + p.dataset.for;
      p.textContent = msgs ? [].concat(msgs).join(" ") : "";
      p.hidden = !msgs;
      if (input && input.setAttribute) {
        if (msgs) {
          input.setAttribute("aria-invalid", "true");
          input.setAttribute("aria-describedby", p.id);
        } else {
          input.removeAttribute("aria-invalid");
          input.removeAttribute("aria-describedby");
        }
      }
    });
    if (message) banner.focus();
  }

  const SHA256 = /^(sha256:)?[0-9a-f]{64}$/;

  // What can be checked before anything is created: all of it at once, so an empty submit
  // flags every missing field and a bad sha256 leaves no image record behind.
  function localErrors(file) {
    const errors = {};
    if (!form.elements.name.value.trim()) errors.name = ["Give the image a name."];
    if (!form.elements.version.value.trim()) errors.version = ["Give the image a version, e.g. 1.0."];
    if (!file) errors.file = ["Choose the image file to upload."];
    else if (file.size > Number(form.dataset.max)) {
      errors.file = ["The file is " + mib(file.size) + "; the limit is " + mib(Number(form.dataset.max)) + "."];
    }
    const sha = form.elements.sha256.value.trim();
    if (sha && !SHA256.test(sha)) errors.sha256 = ["A sha256 is 64 hexadecimal digits (lower case), optionally after sha256:."];
    return errors;
  }

  function mib(n) { return (n / 1048576).toFixed(1) + " MiB"; }

  async function createImage() {
    const body = {
      tenant: form.dataset.tenant,
      name: form.elements.name.value.trim(),
      version: form.elements.version.value.trim(),
      os: form.elements.os.value.trim(),
      description: form.elements.description.value,
    };
    const r = await fetch(form.dataset.api, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf, "Accept": "application/json" },
      body: JSON.stringify(body),
    });
    const data = await r.json().catch(function () { return { message: "HTTP " + r.status }; });
    if (r.status !== 201) {
      showErrors(data.message || "The image could not be created.", data.errors);
      return null;
    }
    return data.id;
  }

  function putFile(id, file) {
    return new Promise(function (resolve) {
      const params = new URLSearchParams({ type: form.elements.type.value });
      const sha = form.elements.sha256.value.trim();
      if (sha) params.set("sha256", sha);
      const xhr = new XMLHttpRequest();
      xhr.open("PUT", form.dataset.api + id + "/file/?" + params.toString());
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.setRequestHeader("X-CSRFToken", csrf);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.onprogress = function (e) {
        if (!e.lengthComputable) return;
        bar.value = Math.round((100 * e.loaded) / e.total);
        statusLine.textContent = mib(e.loaded) + " of " + mib(e.total) + " sent";
      };
      xhr.onload = function () {
        let data = {};
        try { data = JSON.parse(xhr.responseText); } catch (err) { data = { message: "HTTP " + xhr.status }; }
        resolve({ status: xhr.status, data: data });
      };
      xhr.onerror = function () { resolve({ status: 0, data: { message: "The connection broke; nothing was kept. Send it again." } }); };
      xhr.send(file);
    });
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    showErrors("", {});
    const file = form.elements.file.files[0];
    const errors = localErrors(file);
    const count = Object.keys(errors).length;
    if (count) {
      showErrors("The form has " + count + " error" + (count > 1 ? "s" : "") + "; they are shown next to each field.", errors);
      return;
    }
    submit.disabled = true;
    try {
      if (imageId === null) imageId = await createImage();
      if (imageId === null) return;
      barField.hidden = false;
      bar.value = 0;
      statusLine.textContent = "Starting…";
      const result = await putFile(imageId, file);
      if (result.status === 202) {
        statusLine.textContent = "Received; the portal is checking the file.";
        window.location.assign(form.dataset.detail + imageId + "/");
        return;
      }
      showErrors((result.data.message || "The upload failed.") + " The image record is kept; you can send the file again.", result.data.errors);
    } finally {
      submit.disabled = false;
    }
  });
})();
