# Probe checks run on a Windows host itself; the counterpart of probe_host.py, same JSON out.
#   probe_host.ps1 -Check tcp -Address A -Port P -Timeout T
#   probe_host.ps1 -Check http -Url U -Timeout T -Verify 1|0
#   probe_host.ps1 -Check sha256 -PathsJson '["C:\\a", …]'
# TCP uses TcpClient rather than Test-NetConnection: Test-NetConnection has no timeout and
# waits about 20 s on a filtered port. HTTP is Invoke-WebRequest without redirects.
param(
    [Parameter(Mandatory = $true)][string]$Check,
    [string]$Address,
    [int]$Port,
    [string]$Url,
    [double]$Timeout = 10,
    [string]$Verify = '1',
    [string]$PathsJson = '[]'
)
$ErrorActionPreference = 'Stop'
$BodyLimit = 65536

function Test-Tcp([string]$Address, [int]$Port, [double]$Timeout) {
    $client = New-Object System.Net.Sockets.TcpClient
    try {
        $connect = $client.ConnectAsync($Address, $Port)
        if (-not $connect.Wait([int]($Timeout * 1000))) { return @{ ok = $false; error = 'timed out' } }
        return @{ ok = $true }
    } catch {
        $inner = $_.Exception
        while ($inner.InnerException) { $inner = $inner.InnerException }
        return @{ ok = $false; error = $inner.Message }
    } finally {
        $client.Dispose()
    }
}

function Test-Http([string]$Url, [double]$Timeout, [string]$Verify) {
    if ($Verify -ne '1') {
        [System.Net.ServicePointManager]::ServerCertificateValidationCallback = { $true }
    }
    try {
        $response = Invoke-WebRequest -Uri $Url -UseBasicParsing -MaximumRedirection 0 -TimeoutSec ([int][Math]::Ceiling($Timeout))
        $status = [int]$response.StatusCode
        $body = [string]$response.Content
    } catch {
        $answer = $_.Exception.Response
        if ($null -eq $answer) { return @{ error = $_.Exception.Message } }
        $status = [int]$answer.StatusCode
        $reader = New-Object System.IO.StreamReader($answer.GetResponseStream())
        $body = $reader.ReadToEnd()
        $reader.Dispose()
    }
    if ($body.Length -gt $BodyLimit) { $body = $body.Substring(0, $BodyLimit) }
    return @{ status = $status; body = $body }
}

function Get-Digests([string[]]$Paths) {
    $digests = @{}
    foreach ($path in $Paths) {
        try {
            $digests[$path] = (Get-FileHash -LiteralPath $path -Algorithm SHA256).Hash.ToLower()
        } catch {
            $digests[$path] = $null
        }
    }
    return @{ digests = $digests }
}

switch ($Check) {
    'tcp' { $result = Test-Tcp $Address $Port $Timeout }
    'http' { $result = Test-Http $Url $Timeout $Verify }
    'sha256' { $result = Get-Digests @($PathsJson | ConvertFrom-Json) }
    default { throw "unknown check $Check" }
}
$result | ConvertTo-Json -Compress -Depth 4
